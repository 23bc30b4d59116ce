"""The whole DAG through a real Prefect API, on the embedded sample profile."""

import json
import re

import pytest

from clipgram import catalog, dag, demo, search, status, synthetic, tables
from clipgram.cli import main
from clipgram.flows.ingest import ingest_account
from clipgram.models import clip
from clipgram.sources import instagram


@pytest.fixture(scope="module")
def recorded_copy(tmp_path_factory, sample_site):
    return demo.materialize(tmp_path_factory.mktemp("recorded"), sample_site)


@pytest.fixture(scope="module")
def ingested(prefect_harness, make_config, recorded_copy, tmp_path_factory):
    """One full ingest shared by the tests that only read its results."""
    cfg = make_config(tmp_path_factory.mktemp("data"))
    results = ingest_account(demo.ACCOUNT, cfg.as_dict(), str(recorded_copy))
    return cfg, results


def _parts(cfg):
    """The data's parts (the runs ledger grows with every run by design)."""
    return sorted(p for p in (cfg.data_dir / "tables").rglob("*.parquet")
                  if tables.RUNS.name not in p.parts)


def test_every_stage_runs_and_fills_its_table(ingested, recorded_copy):
    cfg, results = ingested
    posts = instagram.load_recorded(recorded_copy).posts
    images = sum(p.mediacount for p in posts)
    assert [r.stage for r in results] == list(dag.NAMES)
    by_stage = {r.stage: r for r in results}
    assert by_stage["scrape"].done == len(posts)
    assert by_stage["download"].done == images and by_stage["download"].failed == 0
    assert by_stage["embed"].done == by_stage["publish"].done == images
    # the run captions too: the embed stage's pass captioned every image from the same decode
    assert by_stage["embed"].details["captioned"] == by_stage["embed"].details["decoded"] == images
    assert by_stage["caption"].done == 0 and "embed stage captioned" in by_stage["caption"].note
    assert by_stage["analyse"].done == images  # every image labelled, clustered, mapped

    con = catalog.connect(cfg.data_dir)
    dim = int(catalog.meta(con)["clip_dim"])
    assert con.execute("SELECT typeof(embedding) FROM embeddings LIMIT 1").fetchone() == (f"FLOAT[{dim}]",)
    norms = con.execute("SELECT min(list_norm), max(list_norm) FROM "
                        "(SELECT sqrt(list_sum(list_transform(embedding::FLOAT[], x -> x * x))) "
                        "AS list_norm FROM embeddings)").fetchone()
    assert norms == pytest.approx((1.0, 1.0), abs=1e-4)
    assert con.execute("SELECT count(*), count(DISTINCT sha256) FROM embeddings").fetchone() == (images, images)
    assert con.execute("SELECT count(*) FROM captions WHERE length(caption) > 0").fetchone() == (images,)
    for row in con.execute("SELECT account, sha256 FROM media").fetchall():
        assert row[0] == demo.ACCOUNT and re.fullmatch("[0-9a-f]{64}", row[1])


def test_second_run_writes_nothing(ingested, recorded_copy):
    cfg, _ = ingested
    parts = _parts(cfg)
    mtime = (cfg.data_dir / "catalog.duckdb").stat().st_mtime
    results = ingest_account(demo.ACCOUNT, cfg.as_dict(), str(recorded_copy))
    assert [r.done for r in results] == [0] * len(dag.NAMES)
    assert all(r.note.startswith("skipped") for r in results[1:])
    assert _parts(cfg) == parts and (cfg.data_dir / "catalog.duckdb").stat().st_mtime == mtime


def test_a_clipgram_that_builds_the_catalog_otherwise_publishes_again(ingested, recorded_copy, monkeypatch):
    """No table changed, but the catalog's SQL did (a new clipgram): publish runs again, alone."""
    cfg, _ = ingested
    parts = _parts(cfg)
    monkeypatch.setattr(catalog, "layout", lambda: "the next version's views and macros")
    results = {r.stage: r for r in ingest_account(demo.ACCOUNT, cfg.as_dict(), str(recorded_copy))}
    assert all(results[s].note.startswith("skipped") for s in ("download", "embed", "caption"))
    assert results["publish"].done > 0 and _parts(cfg) == parts


def _scene_misses(cfg, mode: str) -> tuple[list, list]:
    """For each colour and shape the posts mention, search for it: (the pairs, those whose top
    image does not show it or whose generated caption does not name it). The truth is what
    the sample drew."""
    con = catalog.connect(cfg.data_dir)
    encoder = clip.from_config(cfg.models)
    shown = demo.scenes()
    pairs = sorted(set(con.execute("SELECT hashtags[1], hashtags[2] FROM posts").fetchall())
                   & {(c, s) for c in synthetic.COLORS for s in synthetic.SHAPES})  # not the posters' tags
    assert len(pairs) >= 15  # the sample names most of the 24 pairs
    misses = []
    for color, shape in pairs:
        _, hits = search.search(con, cfg.data_dir, [search.Term("text", f"a {color} {shape}")], 1, mode,
                                encoder=encoder)
        url, generated = con.execute("SELECT url, generated_caption FROM media JOIN images USING (media_id) "
                                     "WHERE media_id = ?", [hits[0].media_id]).fetchone()
        scene = shown.get(url.rsplit("/", 1)[1])  # None: a poster
        if scene is None or (scene.color, scene.shape) != (color, shape) or not (generated or "").startswith(f"a {color} {shape} "):
            misses.append((color, shape, scene, generated))
    return pairs, misses


@pytest.mark.parametrize("mode", ["hybrid", "clip"])
def test_every_scene_the_posts_name_is_found_first_and_captioned(ingested, mode):
    pairs, misses = _scene_misses(ingested[0], mode)
    assert pairs and not misses, misses


def test_caption_full_text_search_ranks_matching_captions(ingested):
    cfg, _ = ingested
    con = catalog.connect(cfg.data_dir)
    hits = search.caption_search(con, cfg.data_dir, "triangle", k=50)
    assert hits and all("triangle" in con.execute(
        "SELECT lower(generated_caption || ' ' || post_caption || ' ' || hashtags || ' ' || "
        "accessibility_caption) FROM documents WHERE media_id = ?", [h.media_id]).fetchone()[0]
        for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_cli_search_sql_and_status(ingested, capsys):
    cfg, _ = ingested
    base = ["--data-dir", str(cfg.data_dir), "--clip-model", "tiny", "--captioner", "tiny",
            "--device", "cpu"]
    assert main(["search", "a red circle", "-k", "3", "--mode", "clip", "--json", *base]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert all((cfg.data_dir / r["path"]).exists() and r["account"] == demo.ACCOUNT for r in rows)

    assert main(["sql", "SELECT media_id, array_cosine_similarity(embedding, clip_text('a red circle')) "
                 "AS score FROM images JOIN embeddings USING (sha256) ORDER BY score DESC LIMIT 3",
                 "--json", *base]) == 0
    sql_rows = json.loads(capsys.readouterr().out)
    assert [r["media_id"] for r in sql_rows] == [r["media_id"] for r in rows]

    assert main(["sql", "SELECT count(*) AS n FROM posts", "--csv", *base]) == 0
    posts = tables.connect(cfg.data_dir).execute("SELECT count(*) FROM posts").fetchone()[0]
    assert capsys.readouterr().out.splitlines() == ["n", str(posts)]

    assert main(["status", "--json", *base]) == 0
    status = {r["stage"]: r for r in json.loads(capsys.readouterr().out)}
    assert status["download"]["done"] == status["embed"]["done"] == status["caption"]["done"] > 0
    assert all(status[s]["pending"] == 0 for s in ("download", "embed", "caption"))


def test_status_counts_pending_work(make_config, recorded, tmp_path):
    cfg = make_config(tmp_path / "data")
    instagram.scrape(cfg.data_dir, demo.ACCOUNT, recorded)
    stage_rows = {r["stage"]: r for r in status.rows(cfg.data_dir, None, None)}
    images = tables.connect(cfg.data_dir).execute("SELECT count(*) FROM media").fetchone()[0]
    assert stage_rows["download"]["pending"] == images and stage_rows["download"]["done"] == 0
