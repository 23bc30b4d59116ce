"""An object store that fails (the test S3 server behind a proxy that answers 500 InternalError,
503 SlowDown or drops the connection, tests/faulty_store.py): failures for a while are retried
with backoff and the run ends as one that met none; a store that stays down stops the command
with one line naming it, leaves nothing half-written in the store, and a rerun converges."""

import pyarrow.parquet as pq
import pytest
from conftest import BUCKET, MODEL_CACHE, as_toml
from faulty_store import faulty
from snapshots import assert_same, snapshot

from clipgram import cli, demo, storage

FOLDER = demo.SAMPLE_DIR / "images"
FAULTS = ("500", "503", "drop")


def _config(path, url, mirror, options, retry_s):
    path.write_text(as_toml({"data": {"dir": url, "cache_dir": str(mirror), "storage_options": options,
                                      "retry_s": retry_s},
                             "models": {"clip": "tiny", "captioner": "tiny", "device": "cpu",
                                        "cache_dir": str(MODEL_CACHE)}}))
    return path


def _ingest(config) -> int:
    return cli.main(["ingest", str(FOLDER), "--as", "scenes", "--config", str(config)])


def _in_store(fs, url, config_path, tmp_path, name):
    """A fresh machine's view of the store (straight to the server): its tables' snapshot."""
    storage.pull(storage.local_dir(url, str(tmp_path / name), fs.storage_options))
    return snapshot(tmp_path / name, catalog=False)


@pytest.fixture(scope="module")
def reference(prefect_harness, tmp_path_factory):
    data = tmp_path_factory.mktemp("reference") / "data"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CLIPGRAM_MODELS_CACHE_DIR", str(MODEL_CACHE))
        assert cli.main(["ingest", str(FOLDER), "--as", "scenes", "--data-dir", str(data),
                         "--clip-model", "tiny", "--captioner", "tiny", "--device", "cpu"]) == 0
    return snapshot(data, catalog=False)


def test_a_store_failing_for_a_while_is_retried_and_the_run_ends_as_a_clean_one(
        reference, s3, tmp_path, capfd, caplog):
    options, fs = s3
    url = f"s3://{BUCKET}/flaky"
    with faulty(options["endpoint_url"]) as (endpoint, store):
        # every request from the 30th to the 89th fails; the S3 client's own retries are off
        # (one attempt), so that clipgram's backoff is what rides it out
        store.plan = lambda n: FAULTS[n % 3] if 30 <= n < 90 else None
        config = _config(tmp_path / "c.toml", url, tmp_path / "mirror", {
            **options, "endpoint_url": endpoint, "config_kwargs": {"retries": {"max_attempts": 1}}}, 60)
        assert _ingest(config) == 0, capfd.readouterr().err
    assert set(store.faults) == set(FAULTS) and sum(store.faults.values()) == 60
    assert "retrying" in caplog.text  # it said why it was slow
    assert_same(_in_store(fs, url, config, tmp_path, "check"), reference)


def test_a_store_that_stays_down_stops_in_one_line_and_a_rerun_converges(reference, s3, tmp_path, capfd):
    options, fs = s3
    url = f"s3://{BUCKET}/down"
    with faulty(options["endpoint_url"]) as (endpoint, store):
        store.plan = lambda n: FAULTS[n % 3] if n >= 40 else None  # down for good after 40 requests
        config = _config(tmp_path / "c.toml", url, tmp_path / "mirror", {**options, "endpoint_url": endpoint}, 3)
        capfd.readouterr()
        assert _ingest(config) == 2
        err = capfd.readouterr().err
        store.plan = lambda n: None  # back up
        assert store.faults and "Traceback" not in err, err
        said = [line for line in err.splitlines() if line.startswith("error")]
        assert len(said) == 1 and url in said[0], err
        # nothing half-written is visible: every object under tables/ is a whole Parquet file
        keys = fs.find(f"{BUCKET}/down/tables")
        assert keys and not [k for k in keys if k.rsplit("/", 1)[1].startswith(".")]
        for key in keys:
            with fs.open(key, "rb") as f:
                pq.read_table(f)
        assert _ingest(config) == 0, capfd.readouterr().err
    assert_same(_in_store(fs, url, config, tmp_path, "check"), reference)
