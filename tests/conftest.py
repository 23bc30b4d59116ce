import json
import os
import pathlib

import pytest

# Prefect: no telemetry from an offline machine; quiet logs (its console handler
# outlives pytest's captured streams)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

MODEL_CACHE = pathlib.Path(os.environ.get(
    "CLIPGRAM_TEST_MODEL_CACHE", pathlib.Path.home() / ".cache" / "clipgram" / "models"))


@pytest.fixture(scope="session")
def tiny_clip_ckpt():
    from clipgram.models import tiny

    return tiny.ensure_checkpoint(tiny.TINY_CLIP, MODEL_CACHE)


@pytest.fixture(scope="session")
def tiny_coca_ckpt():
    from clipgram.models import tiny

    return tiny.ensure_checkpoint(tiny.TINY_COCA, MODEL_CACHE)


@pytest.fixture(scope="session")
def sample_paths():
    """The sample profile's JPEGs, in name order."""
    from clipgram import demo

    return sorted((demo.SAMPLE_DIR / "images").glob("*.jpg"))


@pytest.fixture(scope="session")
def prefect_harness():
    """A real, temporary Prefect API for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def sample_site():
    """The embedded sample profile's images served over real HTTP on 127.0.0.1."""
    from clipgram import demo

    with demo.serve(demo.SAMPLE_DIR) as base_url:
        yield base_url


@pytest.fixture
def recorded(tmp_path, sample_site):
    """A copy of the sample profile's instaloader JSON pointing at the local server."""
    from clipgram import demo

    return demo.materialize(tmp_path / "recorded", sample_site)


@pytest.fixture(scope="session")
def make_config(tiny_clip_ckpt, tiny_coca_ckpt):
    """Settings for a test: the given data dir, the offline models, the CPU."""
    from clipgram.config import load_config

    def make(data_dir, **sections):
        overrides = {"data": {"dir": str(data_dir)},
                     "models": {"clip": "tiny", "captioner": "tiny", "device": "cpu",
                                "cache_dir": str(MODEL_CACHE)},
                     "embed": {"batch_size": 8}, "caption": {"batch_size": 8},
                     # test servers listen on 127.0.0.1
                     "download": {"allow_private_network": True}}
        for section, values in sections.items():
            overrides.setdefault(section, {}).update(values)
        return load_config(overrides=overrides, environ={})

    return make


@pytest.fixture(scope="session")
def ingested_sample(prefect_harness, make_config, sample_site, tmp_path_factory):
    """The sample profile ingested once for the search and analysis tests (they only add
    derived tables, which each test that needs them writes itself)."""
    from clipgram import demo
    from clipgram.flows.ingest import ingest_account

    recorded = demo.materialize(tmp_path_factory.mktemp("recorded-shared"), sample_site)
    cfg = make_config(tmp_path_factory.mktemp("data-shared"))
    ingest_account(demo.ACCOUNT, cfg.as_dict(), str(recorded))
    return cfg


@pytest.fixture(scope="session")
def app_library(ingested_sample, tmp_path_factory):
    """A copy of the ingested sample with clusters, a map and duplicate groups: what the app shows."""
    import shutil

    from clipgram.cli import main

    data = tmp_path_factory.mktemp("app-library") / "data"
    shutil.copytree(ingested_sample.data_dir, data)
    base = ["--data-dir", str(data), "--clip-model", "tiny", "--captioner", "tiny", "--device", "cpu"]
    for command in (["clusters", "-k", "3"], ["map", "--out", str(data / "map.png")], ["duplicates"]):
        assert main([*command, *base]) == 0
    return data


@pytest.fixture(scope="session")
def as_downloaded():
    """Write media rows for image files as the download stage leaves them (sha256 = their index)."""
    from clipgram import tables

    def write(cfg, paths, account):
        tables.write_part(cfg.data_dir, tables.MEDIA, account, [
            {"media_id": f"{account}_{p.stem}", "shortcode": p.stem, "position": 0, "status": "done",
             "sha256": f"{i:064x}", "path": str(p)} for i, p in enumerate(paths)])

    return write


BUCKET = "clipgram-test"


@pytest.fixture(scope="session")
def s3():
    """(storage options, filesystem) of a fresh S3 server (moto, the real S3 protocol over HTTP
    on 127.0.0.1) with one bucket."""
    import logging

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "test", "secret": "test"}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir(BUCKET)
    yield options, fs
    server.stop()


def as_toml(settings: dict) -> str:
    """Sections of scalars and inline tables as TOML (json's strings and numbers are TOML's)."""
    def value(v):
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return json.dumps(v)
    return "".join(f"[{section}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in values.items())
                   for section, values in settings.items())
