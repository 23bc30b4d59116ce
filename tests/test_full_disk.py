"""A disk that fills up during an ingest, an analysis or while the app caches thumbnails (a
small tmpfs: needs root, as these machines and CI run): one line naming the full disk, no
traceback, no file that does not read; once space is freed, the same command ends with the
rows of a run that never met the fault."""

import errno
import io
import os
import shutil
import subprocess

import httpx
import pyarrow.parquet as pq
import pytest
from conftest import MODEL_CACHE
from PIL import Image
from snapshots import assert_same, snapshot

from clipgram import cli, demo
from clipgram.analysis import derived, fits
from clipgram.app import library, server, thumbs

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


def _fill(mount, leave: int = 0):
    """A file that takes every byte of the disk at `mount` but about `leave`; unlink it to free them."""
    filler = mount / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 20, 1 << 12):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC
        if leave:
            os.ftruncate(fd, os.fstat(fd).st_size - leave)
    finally:
        os.close(fd)
    return filler


def _assert_nothing_torn(data) -> None:
    for part in data.rglob("*.parquet"):
        pq.read_table(part)
    for picture in data.glob("map*.png"):
        Image.open(picture).load()
    assert not [p for p in data.rglob("*.tmp") if p.is_file()]


def _analyses(data) -> dict:
    """The clusters and the map, row by row."""
    return {d.name: sorted(tuple(row.values()) for f in (data / "tables" / d.name).rglob("*.parquet")
                           for row in pq.read_table(f).to_pylist())
            for d in (derived.CLUSTERS, derived.MAP)}


ANALYSES = (["clusters", "-k", "3"], ["map"])


def _unanalysed(source, data) -> None:
    """A copy of the library without clusters or a map (other tests may have made some): the
    commands then write new files, so their publish builds a catalog, which a full disk meets."""
    shutil.copytree(source, data, ignore=shutil.ignore_patterns(derived.CLUSTERS.name, derived.MAP.name,
                                                                fits.FITS_DIR))


@pytest.fixture(scope="module")
def analysed(ingested_sample, tmp_path_factory):
    data = tmp_path_factory.mktemp("analysed") / "data"
    _unanalysed(ingested_sample.data_dir, data)
    for command in ANALYSES:
        assert cli.main([*command, "--data-dir", str(data)]) == 0
    return _analyses(data), (data / "map.png").read_bytes()


# where the disk is full (on this machine; each place gives the same promises): 0 at the
# analysis' table part, 40k at publish's vector matrix (it was a memory map: SIGBUS), 400k
# inside DuckDB's writes of the new catalog
@pytest.mark.parametrize("leave", [0, 40_000, 400_000])
def test_clusters_and_map_on_a_full_disk_stop_in_one_line_and_a_rerun_finishes(
        ingested_sample, analysed, small_disk, capfd, leave):
    mount, size = small_disk
    size("16m")
    data = mount / "data"
    _unanalysed(ingested_sample.data_dir, data)
    filler = _fill(mount, leave)
    capfd.readouterr()
    codes = []
    for command in ANALYSES:
        codes.append(cli.main([*command, "--data-dir", str(data)]))
        err = capfd.readouterr().err
        if codes[-1]:
            said = [line for line in err.splitlines() if "error" in line.lower()]
            assert codes[-1] == 2 and len(said) == 1 and "is full: free some space" in said[0], err
            assert "Traceback" not in err
        _assert_nothing_torn(data)
    assert codes[0] == 2, "the disk was not full enough for the test to mean anything"

    filler.unlink()
    for command in ANALYSES:
        assert cli.main([*command, "--data-dir", str(data)]) == 0
    tables, png = analysed
    assert _analyses(data) == tables
    assert (data / "map.png").read_bytes() == png
    _assert_nothing_torn(data)


def test_a_map_picture_on_a_full_disk_leaves_the_last_one_whole(ingested_sample, small_disk, tmp_path, capfd):
    mount, size = small_disk
    size("1m")
    data = tmp_path / "data"
    shutil.copytree(ingested_sample.data_dir, data)
    draw = ["map", "--data-dir", str(data), "--out", str(mount / "map.png")]
    assert cli.main(draw) == 0
    before = (mount / "map.png").read_bytes(), (mount / "map.html").read_bytes()
    filler = _fill(mount)
    capfd.readouterr()
    assert cli.main(draw) == 2
    err = capfd.readouterr().err
    assert f"error: the disk holding {mount}" in err and "Traceback" not in err
    assert ((mount / "map.png").read_bytes(), (mount / "map.html").read_bytes()) == before
    assert sorted(p.name for p in mount.iterdir()) == ["filler", "map.html", "map.png"]
    filler.unlink()
    assert cli.main(draw) == 0
    assert ((mount / "map.png").read_bytes(), (mount / "map.html").read_bytes()) == before


def test_the_app_on_a_full_disk_serves_thumbnails_uncached_then_caches_them(
        app_library, ingested_sample, small_disk, caplog):
    mount, size = small_disk
    size("16m")
    data = mount / "data"
    shutil.copytree(app_library, data, ignore=shutil.ignore_patterns(thumbs.FOLDER))
    filler = _fill(mount)
    lib = library.Library(data, ingested_sample.models)
    with server.running(lib) as url, httpx.Client(base_url=url, timeout=60) as http:
        results = http.get("/api/search", params={"q": "a shape", "k": 30, "mode": "clip"}).json()["results"]
        served = {}
        for r in results:
            answer = http.get(r["thumbnail"])
            assert answer.status_code == 200 and answer.headers["content-type"] == "image/jpeg"
            served[r["sha256"]] = answer.content
            assert max(Image.open(io.BytesIO(answer.content)).size) <= thumbs.SIDE
        cache = data / thumbs.FOLDER
        assert not [p for p in cache.rglob("*") if p.is_file()]  # nothing cached, nothing torn
        assert sum("is full" in r.getMessage() for r in caplog.records) == 1  # said once, not per picture

        filler.unlink()
        for r in results:
            assert http.get(r["thumbnail"]).content == served[r["sha256"]]
        assert {p.stem for p in cache.rglob("*.jpg")} == set(served)
