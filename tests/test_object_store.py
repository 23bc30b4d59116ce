"""An object-store data dir: S3 (a moto server on 127.0.0.1, the real S3 protocol over HTTP)
holds the tables and media; each "machine" works in its own local mirror."""

import json

import pytest
from conftest import BUCKET

from clipgram import catalog, cli, demo, storage, tables
from clipgram.flows.ingest import ingest_account


@pytest.fixture
def machines(s3, make_config, tmp_path, request):
    """Two machines' settings for one S3 data dir (a prefix of its own per test)."""
    options, _ = s3
    url = f"s3://{BUCKET}/{request.node.name}"

    def machine(name):
        return make_config(url, data={"cache_dir": str(tmp_path / name), "storage_options": options})

    return url, machine("a"), machine("b")


def _stored(fs, url, under):
    return sorted(k.split("/", 2)[2] for k in fs.find(f"{url.removeprefix('s3://')}/{under}"))


def _machine_file(tmp_path, name, url, options, like):
    """A settings file for the CLI of one more machine on the S3 data dir, models as `like`'s."""
    config = tmp_path / f"{name}.toml"
    inline = ", ".join(f"{k} = {json.dumps(v)}" for k, v in options.items())  # a TOML inline table
    config.write_text(f'[data]\ndir = "{url}"\ncache_dir = "{tmp_path / name}"\n'
                      f"storage_options = {{ {inline} }}\n"
                      f'[models]\nclip = "tiny"\ncaptioner = "tiny"\ndevice = "cpu"\n'
                      f'cache_dir = "{like.models.cache_dir}"\n')
    return config


def _rows(cfg, sql):
    return tables.connect(cfg.data_dir).execute(sql).fetchall()


def test_stages_on_two_machines_share_one_s3_data_dir(prefect_harness, machines, s3, recorded, tmp_path):
    url, a, b = machines
    fs = s3[1]
    # machine A scrapes and downloads; machine B embeds and publishes (captioning is the same
    # loop as embedding, pipeline/inference.py: left out to keep the test short)
    ingest_account(demo.ACCOUNT, a.as_dict(), str(recorded), stages_to_run=["scrape", "download"])
    media = _rows(a, "SELECT path FROM media WHERE status = 'done'")
    assert media, "the sample's images were downloaded"
    assert {p for (p,) in media} <= set(_stored(fs, url, "media")), "every done row's file is in S3"

    assert not (b.data_dir / "media").exists()
    ingest_account(demo.ACCOUNT, b.as_dict(), str(recorded), stages_to_run=["embed", "publish"])
    embedded = _rows(b, "SELECT count(*) FROM embeddings")[0][0]
    assert embedded == len({p for (p,) in media}) > 0  # B fetched A's images from the store

    # every stage's output is in the store, so A sees B's work after a pull
    stored_tables = {k.split("/")[1] for k in _stored(fs, url, "tables")}
    assert {"posts", "media", "embeddings", "runs"} <= stored_tables
    storage.pull(a.data_dir)
    vectors = "SELECT sha256, embedding FROM embeddings ORDER BY 1"
    assert _rows(a, vectors) == _rows(b, vectors)

    # a third machine with an empty mirror queries through the CLI: its catalog is built there
    config = _machine_file(tmp_path, "c", url, s3[0], a)
    page = tmp_path / "hits.html"
    assert cli.main(["search", "--config", str(config), "--captions", "red", "--html", str(page)]) == 0
    assert cli.main(["sql", "--config", str(config), "--json",
                     "SELECT count(*) AS n FROM images"]) == 0
    assert (tmp_path / "c" / catalog.CATALOG).exists()
    shown = [line.split('src="', 1)[1].split('"', 1)[0] for line in page.read_text().splitlines()
             if 'src="' in line]
    assert shown and all((page.parent / src).exists() for src in shown), "the page's images were fetched"

    # a rerun on A changes nothing: no new rows, no new objects
    before = (_stored(fs, url, "media"), _rows(a, "SELECT count(*) FROM media")[0][0])
    ingest_account(demo.ACCOUNT, a.as_dict(), str(recorded),
                   stages_to_run=["scrape", "download", "embed", "publish"])
    assert (_stored(fs, url, "media"), _rows(a, "SELECT count(*) FROM media")[0][0]) == before
    assert _rows(a, "SELECT count(*) FROM embeddings")[0][0] == embedded


def test_repair_moves_a_torn_object_aside_in_the_store_and_a_rerun_redoes_its_rows(
        prefect_harness, machines, s3, recorded, tmp_path):
    url, a, b = machines
    fs = s3[1]
    ingest_account(demo.ACCOUNT, a.as_dict(), str(recorded), stages_to_run=["scrape", "download", "embed"])
    embedded = _rows(a, "SELECT count(*) FROM embeddings")[0][0]
    rel = _stored(fs, url, "tables/embeddings")[0]
    key = f"{url.removeprefix('s3://')}/{rel}"
    whole = fs.cat_file(key)
    fs.pipe_file(key, whole[: len(whole) // 2])  # a sync tool or a crashed upload cut it short

    config = _machine_file(tmp_path, "c", url, s3[0], a)
    assert cli.main(["doctor", "--config", str(config)]) == 1  # machine C pulled it, and names it
    assert cli.main(["repair", "--config", str(config)]) == 0
    assert rel not in _stored(fs, url, "tables")  # gone from the store, so no pull brings it back
    assert fs.cat_file(f"{url.removeprefix('s3://')}/quarantine/{rel}") == whole[: len(whole) // 2]
    fresh = _machine_file(tmp_path, "d", url, s3[0], a)
    assert cli.main(["doctor", "--config", str(fresh)]) == 0

    ingest_account(demo.ACCOUNT, b.as_dict(), str(recorded), stages_to_run=["embed"])
    storage.pull(a.data_dir)  # A's own copy of the part went too: the store no longer has it
    assert _rows(a, "SELECT count(*), count(DISTINCT sha256) FROM embeddings")[0] == (embedded, embedded)


def test_pull_follows_the_store(machines, s3):
    """New parts arrive, parts removed elsewhere (ledger compaction) go, replaced files refresh."""
    url, a, b = machines
    row = {"media_id": "x_0", "shortcode": "x", "position": 0, "url": "https://e/x", "status": "pending"}
    first = tables.write_part(a.data_dir, tables.MEDIA, "acct", [row])
    storage.pull(b.data_dir)
    mirrored = b.data_dir / first.relative_to(a.data_dir)
    assert mirrored.read_bytes() == first.read_bytes()

    second = tables.write_part(a.data_dir, tables.MEDIA, "acct", [{**row, "status": "failed"}])
    storage.remove([first])
    assert not first.exists()
    storage.pull(b.data_dir)
    assert not mirrored.exists()
    assert _rows(b, "SELECT status FROM media") == [("failed",)]
    assert (b.data_dir / second.relative_to(a.data_dir)).exists()


def test_an_unreachable_store_is_a_clear_error(make_config, tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(f'[data]\ndir = "s3://nowhere/lib"\ncache_dir = "{tmp_path / "m"}"\n'
                      'storage_options = { endpoint_url = "http://127.0.0.1:9", key = "k", secret = "s", '
                      'config_kwargs = { connect_timeout = 1, retries = { max_attempts = 1 } } }\n'
                      'retry_s = 1\n')
    assert cli.main(["sql", "--config", str(config), "SELECT 1"]) == 2
    err = capsys.readouterr().err
    assert "s3://nowhere/lib" in err and "storage_options" in err
