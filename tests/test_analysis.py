"""Labels, clusters, map and duplicates from stored embeddings; the README's example queries."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipgram import catalog, tables
from clipgram.analysis import clusters, derived
from clipgram.cli import main
from clipgram.models import clip
from clipgram.stages import publish

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def analysed(ingested_sample, capsys_module=None):
    """Labels, clusters and duplicates written once, with image encoding forbidden throughout."""
    cfg = ingested_sample
    encoder = clip.from_config(cfg.models)
    original = encoder.start_encoding  # encode_images goes through it too

    def refuse(*_):
        raise AssertionError("analysis must read stored embeddings, not re-encode images")
    encoder.start_encoding = refuse
    try:
        for argv in (["labels", "run"], ["clusters", "-k", "auto"], ["duplicates"]):
            assert _run(cfg, *argv) == 0
    finally:
        encoder.start_encoding = original
    return cfg


def _run(cfg, *argv):
    return main([*argv, "--data-dir", str(cfg.data_dir), "--clip-model", "tiny", "--captioner", "tiny",
                 "--device", "cpu"])


def _json(cfg, capsys, *argv):
    capsys.readouterr()
    assert _run(cfg, *argv, "--json") == 0
    return json.loads(capsys.readouterr().out)


def test_colour_labels_match_the_posts_and_are_distributions(analysed):
    con = catalog.connect(analysed.data_dir)
    right, total = con.execute("""
        SELECT sum(list_contains(p.hashtags[1:2], l.label)::INT), count(*) FROM labels l
        JOIN images i USING (sha256) JOIN posts p USING (account, shortcode)
        WHERE l.label_set = 'colour' AND l.rank = 1 AND p.typename = 'GraphImage'""").fetchone()
    assert right / total >= 0.8
    sums = con.execute("SELECT label_set, sha256, sum(score), list_sort(list(rank)) FROM labels "
                       "GROUP BY ALL").fetchall()
    assert all(abs(s - 1) < 1e-4 and ranks == list(range(1, len(ranks) + 1)) for _, _, s, ranks in sums)


def test_label_filter_and_defined_sets(analysed, capsys):
    cfg = analysed
    hits = _json(cfg, capsys, "search", "a shape", "--label", "colour=blue", "-k", "50")
    con = catalog.connect(cfg.data_dir)
    blue = {r[0] for r in con.execute("SELECT i.media_id FROM labels l JOIN images i USING (sha256) "
                                      "WHERE label_set = 'colour' AND label = 'blue' AND rank = 1").fetchall()}
    assert hits and {h["media_id"] for h in hits} == blue
    assert _run(cfg, "labels", "define", "tone", "warm=a red shape|an orange shape", "cool=a blue shape") == 0
    assert _run(cfg, "labels", "run", "--set", "tone") == 0
    con = catalog.connect(cfg.data_dir)
    assert con.execute("SELECT count(DISTINCT sha256), list_sort(list(DISTINCT label)) FROM labels "
                       "WHERE label_set = 'tone'").fetchone() == (con.execute(
                           "SELECT count(*) FROM embeddings").fetchone()[0], ["cool", "warm"])
    assert _run(cfg, "labels", "run", "--set", "no-such-set") == 2


def test_clusters_are_cohesive_and_named_from_their_members(analysed, capsys):
    con = catalog.connect(analysed.data_dir)
    rows = con.execute(f"""SELECT c.cluster, c.cluster_name, c.silhouette, d.text FROM clusters c JOIN
        (SELECT sha256, string_agg(lower(generated_caption || ' ' || post_caption || ' ' || hashtags), ' ') AS text
         FROM documents GROUP BY sha256) d USING (sha256) WHERE scope = '{derived.ALL_ACCOUNTS}'""").fetchall()
    assert len({r[0] for r in rows}) >= 2 and rows[0][2] > 0
    for cluster in {r[0] for r in rows}:
        members = [r for r in rows if r[0] == cluster]
        first_word = members[0][1].split()[0]
        assert sum(first_word in r[3] for r in members) >= len(members) / 2
    # rewriting a scope replaces it whole
    assert _run(analysed, "clusters", "-k", "2") == 0
    con = catalog.connect(analysed.data_dir)
    assert con.execute(f"SELECT count(DISTINCT cluster) FROM clusters WHERE scope = '{derived.ALL_ACCOUNTS}'"
                       ).fetchone() == (2,)
    assert _run(analysed, "clusters", "-k", "auto") == 0


def test_kmeans_and_silhouette_recover_separated_groups():
    rng = np.random.default_rng(1)
    centres = np.eye(16)[:4]
    x = np.concatenate([c + rng.normal(0, 0.05, (30, 16)) for c in centres]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    k, scores = clusters.choose_k(x, 8)
    assert k == 4 and scores[4] > 0.8
    assign, _ = clusters.kmeans(x, 4)
    assert sorted(np.bincount(assign).tolist()) == [30, 30, 30, 30]


def test_duplicates_threshold_and_exact_copies(analysed, capsys, make_config, tmp_path):
    # a copy: the repost added below must not leak into other tests' data
    shutil.copytree(analysed.data_dir, tmp_path / "data")
    cfg = make_config(tmp_path / "data")
    con = catalog.connect(cfg.data_dir)
    ids, vectors = zip(*con.execute("SELECT sha256, embedding FROM embeddings").fetchall())
    sims = np.asarray(vectors) @ np.asarray(vectors).T
    np.fill_diagonal(sims, -1)
    best = float(sims.max())
    i, j = np.unravel_index(sims.argmax(), sims.shape)
    rows = _json(cfg, capsys, "duplicates", "--threshold", f"{best - 1e-4}")
    assert {ids[i], ids[j]} <= {r["sha256"] for r in rows if r["kind"] == "near"}
    assert _json(cfg, capsys, "duplicates", "--threshold", f"{best + 1e-3}") == []
    # the same file posted by a second account: an exact group across accounts, none within one
    row = con.execute("SELECT * EXCLUDE (account, updated_at) FROM media WHERE status = 'done' "
                      "ORDER BY media_id LIMIT 1").to_arrow_table().to_pylist()[0]
    tables.write_part(cfg.data_dir, tables.MEDIA, "repost.account", [row])
    posts = con.execute("SELECT * EXCLUDE (account, updated_at) FROM posts WHERE shortcode = ?",
                        [row["shortcode"]]).to_arrow_table().to_pylist()
    tables.write_part(cfg.data_dir, tables.POSTS, "repost.account", posts)
    con.close()  # open, it would pin the catalog this process sees to the one replaced next
    publish.republish(cfg.data_dir)
    rows = _json(cfg, capsys, "duplicates", "--threshold", "1.01")
    assert {(r["kind"], r["account"], r["sha256"]) for r in rows} == {
        ("exact", "clipgram.demo", row["sha256"]), ("exact", "repost.account", row["sha256"])}
    assert _json(cfg, capsys, "duplicates", "--account", "repost.account", "--threshold", "1.01") == []


def test_map_png_html_and_table(analysed, tmp_path, capsys):
    cfg = analysed
    png = tmp_path / "map.png"
    assert _run(cfg, "map", "--out", str(png)) == 0
    with Image.open(png) as img:
        assert img.size == (1600, 1600) and len(img.getcolors(1 << 20) or []) > 50
    page = png.with_suffix(".html").read_text()
    con = catalog.connect(cfg.data_dir)
    n = con.execute("SELECT count(*) FROM embeddings").fetchone()[0]
    assert page.count("<image ") == n
    assert con.execute(f"SELECT count(*), min(x), max(x), min(y), max(y) FROM map "
                       f"WHERE scope = '{derived.ALL_ACCOUNTS}'").fetchone() == (n, 0.0, 1.0, 0.0, 1.0)


def test_map_as_the_app_suggests_it_writes_into_the_data_directory(analysed, capsys):
    """The app's map page says `clipgram map`: as printed, it works (no --out needed)."""
    assert _run(analysed, "map") == 0
    assert (analysed.data_dir / "map.png").is_file() and (analysed.data_dir / "map.html").is_file()
    assert str(analysed.data_dir / "map.png") in capsys.readouterr().out


def test_readme_example_queries_run(analysed, capsys):
    """Every ```sql block in the README runs in `clipgram sql` and returns rows."""
    queries = re.findall(r"```sql\n(.*?)```", README.read_text(), re.DOTALL)
    assert len(queries) == 10
    for query in queries:
        rows = _json(analysed, capsys, "sql", query)
        assert rows, query
    by_likes = _json(analysed, capsys, "sql", queries[2])
    assert [r["likes"] for r in by_likes] == sorted((r["likes"] for r in by_likes), reverse=True)
    top_colour = _json(analysed, capsys, "sql", queries[0])[0]
    assert "red" in top_colour["generated_caption"]
