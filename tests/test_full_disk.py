"""A disk that fills up during an ingest (a small tmpfs: needs root, as these machines and CI
run): one line naming the full disk, no traceback, no file that does not read; once space
is freed, the same command ends with the rows of a run that never met the fault."""

import os
import subprocess

import pyarrow.parquet as pq
import pytest
from conftest import MODEL_CACHE
from snapshots import assert_same, snapshot

from clipgram import cli, demo

FOLDER = demo.SAMPLE_DIR / "images"


def _ingest(data_dir) -> int:
    return cli.main(["ingest", str(FOLDER), "--as", "scenes", "--data-dir", str(data_dir),
                     "--clip-model", "tiny", "--captioner", "tiny", "--device", "cpu"])


@pytest.fixture
def small_disk(tmp_path):
    """A mount point and a function that (re)mounts a tmpfs of the given size there."""
    mount = tmp_path / "disk"
    mount.mkdir()

    def size(limit: str) -> None:
        options = f"remount,size={limit}" if os.path.ismount(mount) else f"size={limit}"
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount, size
    if os.path.ismount(mount):
        subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture(scope="module")
def reference(prefect_harness, tmp_path_factory):
    data = tmp_path_factory.mktemp("reference") / "data"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CLIPGRAM_MODELS_CACHE_DIR", str(MODEL_CACHE))
        assert _ingest(data) == 0
    return snapshot(data)


@pytest.mark.parametrize("limit", ["200k", "600k"])  # full while importing; full while publishing
def test_a_disk_that_fills_up_mid_ingest_stops_in_one_line_and_a_rerun_finishes(
        reference, small_disk, capfd, monkeypatch, limit):
    monkeypatch.setenv("CLIPGRAM_MODELS_CACHE_DIR", str(MODEL_CACHE))
    mount, size = small_disk
    data = mount / "data"
    size(limit)
    capfd.readouterr()
    assert _ingest(data) == 2
    err = capfd.readouterr().err
    said = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(said) == 1 and said[0].startswith(f"error: the disk holding {mount}"), err
    assert "is full: free some space and run the same command again" in said[0]
    assert "Traceback" not in err
    for part in data.rglob("*.parquet"):  # nothing half-written where a reader looks
        pq.read_table(part)
    assert not list(data.glob(".catalog.duckdb.tmp*"))

    size("64m")
    assert _ingest(data) == 0
    actual = snapshot(data)
    assert_same(actual, reference)
