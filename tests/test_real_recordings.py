"""instaloader output that other people recorded and committed (every era, with and without a
profile file), ingested through the real Prefect flow with its CDN URLs pointed at a local
server. The samples and their provenance: tests/SAMPLES.md."""

import json
import lzma
from datetime import datetime, timezone

import pytest
from instaloader import Post
from realdata import point_at, sample_dir, sample_sets, serve_cdn

from clipgram import tables
from clipgram.flows.ingest import ingest_accounts
from clipgram.sources import instagram

SETS = sample_sets("instaloader")
pytestmark = pytest.mark.skipif(not SETS, reason="real instaloader samples absent (tests/SAMPLES.md)")


def _posts(folder):
    """The recorded post nodes by shortcode, read straight from the files (first file wins)."""
    nodes = {}
    for path in sorted([*folder.glob("*.json"), *folder.glob("*.json.xz")]):
        data = json.load(lzma.open(path, "rt") if path.name.endswith(".xz") else open(path))
        if isinstance(data, dict) and data.get("instaloader", {}).get("node_type") == "Post":
            nodes.setdefault(data["node"]["shortcode"], data["node"])
    return nodes


def _items(node):
    return len((node.get("edge_sidecar_to_children") or {}).get("edges") or []) or 1


@pytest.fixture(scope="module")
def ingested(prefect_harness, make_config, sample_paths, tmp_path_factory):
    source = sample_dir("instaloader")
    tmp = tmp_path_factory.mktemp("real-recordings")
    with serve_cdn(sample_paths) as cdn:
        recorded = {name: str(point_at(source / name, tmp / "recorded" / name, cdn.base_url))
                    for name in SETS}
        cfg = make_config(tmp / "data")
        first = ingest_accounts(SETS, cfg.as_dict(), recorded=recorded)
        requests_after_first = sum(cdn.requests.values())
        second = ingest_accounts(SETS, cfg.as_dict(), recorded=recorded)
        yield cfg, source, first, second, cdn, requests_after_first


@pytest.mark.parametrize("name", SETS)
def test_every_post_and_item_of_a_real_recording_is_ingested(ingested, name):
    cfg, source, first, _, _, _ = ingested
    nodes = _posts(source / name)
    by_stage = {r.stage: r for r in first[name]}
    assert by_stage["scrape"].done == len(nodes) > 0
    con = tables.connect(cfg.data_dir)
    rows = {r[0]: r[1:] for r in con.execute(
        "SELECT shortcode, taken_at, caption, hashtags, likes, comments FROM posts WHERE account = ?",
        [name]).fetchall()}
    assert set(rows) == set(nodes)
    context = instagram.offline_context()
    for code, node in nodes.items():
        taken_at, caption, hashtags, likes, comments = rows[code]
        post = Post(context, node)  # instaloader's own normalisation of the caption
        stamp = node.get("date", node.get("taken_at_timestamp"))
        assert taken_at == datetime.fromtimestamp(stamp, timezone.utc)
        assert caption == post.caption and hashtags == post.caption_hashtags
        assert likes == node["edge_media_preview_like"]["count"]
        assert comments is not None and comments >= 0
    media = con.execute("SELECT shortcode, count(*), count(*) FILTER (status = 'done') FROM media "
                        "WHERE account = ? GROUP BY shortcode", [name]).fetchall()
    assert {code: (n, done) for code, n, done in media} == {
        code: (_items(node), _items(node)) for code, node in nodes.items()}


@pytest.mark.parametrize("name", SETS)
def test_every_image_of_a_real_recording_is_embedded_and_captioned(ingested, name):
    cfg, _, first, _, _, _ = ingested
    by_stage = {r.stage: r for r in first[name]}
    assert by_stage["download"].failed == 0
    con = tables.connect(cfg.data_dir)
    missing = con.execute("""
        SELECT count(*) FROM (SELECT DISTINCT sha256 FROM media WHERE account = ? AND status = 'done')
        WHERE sha256 NOT IN (SELECT sha256 FROM embeddings)
           OR sha256 NOT IN (SELECT sha256 FROM captions WHERE error IS NULL)""", [name]).fetchone()
    assert missing == (0,)


def test_a_profile_file_fills_the_profile_and_a_hashtag_download_lands_under_its_name(ingested):
    cfg, source, *_ = ingested
    con = tables.connect(cfg.data_dir)
    for name in SETS:
        has_profile = any("UTC" not in p.name and p.name.endswith((".json", ".json.xz"))
                          for p in (source / name).iterdir())
        username = con.execute("SELECT username FROM profiles WHERE account = ?", [name]).fetchone()
        assert (username is not None and username[0] is not None) == has_profile, name


def test_a_second_ingest_adds_nothing_and_each_image_url_was_fetched_once(ingested):
    cfg, _, _, second, cdn, requests_after_first = ingested
    assert all(r.done == 0 for results in second.values() for r in results if r.stage != "publish")
    assert sum(cdn.requests.values()) == requests_after_first
    assert set(cdn.requests.values()) == {1}
    con = tables.connect(cfg.data_dir)
    assert con.execute("SELECT count(*) - count(DISTINCT (account, shortcode)) FROM posts").fetchone() == (0,)
    files = list((cfg.data_dir / "tables" / "posts").rglob("*.parquet"))
    assert len(files) == len(SETS)  # the second run wrote no part
