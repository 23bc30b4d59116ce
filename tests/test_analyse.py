"""The analyse stage: labels, clusters, map and duplicates kept current by ingest, incrementally."""

import random
import shutil

import pytest

from clipgram import catalog, demo, status, synthetic
from clipgram.analysis import derived, fits
from clipgram.flows.ingest import ingest_account
from clipgram.models import clip
from clipgram.stages import analyse

B = "folder.account"


def _scenes_by_sha(con) -> dict[str, synthetic.Scene]:
    """The scene of each image that shows one (the demo's posters show text instead)."""
    shown = demo.scenes()
    return {sha: shown[name] for sha, url in con.execute(
        "SELECT sha256, url FROM media WHERE status = 'done'").fetchall() if (name := url.rsplit("/", 1)[1]) in shown}


def test_ingest_leaves_every_analysis_current_and_status_counts_it(ingested_sample):
    cfg = ingested_sample
    con = catalog.connect(cfg.data_dir)
    images = con.execute("SELECT count(DISTINCT sha256) FROM images").fetchone()[0]
    for table in ("clusters", "map"):
        assert con.execute(f"SELECT count(DISTINCT sha256), count(*) FROM {table} "
                           f"WHERE scope = '{derived.ALL_ACCOUNTS}'").fetchone() == (images, images), table
    sets = con.execute("SELECT count(DISTINCT label_set), count(DISTINCT sha256) FROM labels").fetchone()
    assert sets == (3, images)
    # the demo's last post shows an earlier picture again, smaller and recompressed
    assert con.execute("SELECT count(DISTINCT group_id) FROM duplicates WHERE kind = 'near'").fetchone()[0] >= 1
    rows = {r["stage"]: r for r in status.rows(cfg.data_dir, None, None)}
    assert rows["publish"]["done"] == images and rows["analyse"]["done"] == images


def test_clusters_are_named_for_what_their_images_share(ingested_sample):
    """Measured against what the demo drew: a cluster whose images all have one colour, or one
    shape, has it in its name (c-TF-IDF of the captions, not the most frequent words)."""
    con = catalog.connect(ingested_sample.data_dir)
    truth = _scenes_by_sha(con)
    groups: dict[tuple[int, str], list[synthetic.Scene]] = {}
    for cluster, name, sha in con.execute(
            "SELECT cluster, cluster_name, sha256 FROM clusters WHERE scope = ?", [derived.ALL_ACCOUNTS]).fetchall():
        if sha in truth:
            groups.setdefault((cluster, name), []).append(truth[sha])
    assert len(groups) >= 4
    shared = 0
    for (_, name), scenes in groups.items():
        for feature in ("color", "shape"):
            values = {getattr(s, feature) for s in scenes}
            if len(values) == 1 and len(scenes) > 1:
                shared += 1
                assert values.pop() in name.split(), (name, scenes)
    assert shared >= 3


@pytest.fixture
def two_accounts(ingested_sample, tmp_path, monkeypatch):
    """A copy of the ingested demo, then a folder account of 3 new pictures ingested into it with
    the CLIP model's text tower forbidden: the analyse stage must place them on the stored fits."""
    data = tmp_path / "data"
    shutil.copytree(ingested_sample.data_dir, data)
    cfg = ingested_sample.replace("data", dir=str(data))
    with catalog.connect(data) as con:  # closed: an open one pins this catalog, replaced below
        before = {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in ("clusters", "map")}
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, scene in enumerate(synthetic.all_scenes()[:3]):
        synthetic.render(scene, 64, random.Random(i)).save(folder / f"{i}.png")
    encode_text = clip.ClipEncoder.encode_text

    def refuse(self, texts):
        raise AssertionError(f"the analyse stage encoded {texts[:2]}… though no label set changed")
    monkeypatch.setattr(clip.ClipEncoder, "encode_text", refuse)
    results = {r.stage: r for r in ingest_account(B, cfg.as_dict(), source=str(folder))}
    monkeypatch.setattr(clip.ClipEncoder, "encode_text", encode_text)
    return cfg, before, results


def test_new_images_are_placed_on_the_stored_fits(two_accounts):
    cfg, before, results = two_accounts
    con = catalog.connect(cfg.data_dir)
    assert results["analyse"].done == 3 and "fitted" not in results["analyse"].note.split("@")[0]
    new = {sha for sha, in con.execute("SELECT sha256 FROM images WHERE account = ?", [B]).fetchall()}
    assert len(new) == 3
    for table in ("clusters", "map"):
        rows = con.execute(f"SELECT * FROM {table} WHERE scope = ? ORDER BY ALL",
                           [derived.ALL_ACCOUNTS]).fetchall()
        kept = [r for r in before[table] if r[-1] == derived.ALL_ACCOUNTS]
        # every earlier row is still there, unchanged (its cluster, its name, its point)
        assert [r for r in rows if r[1] not in new] == kept, table
        assert {r[1] for r in rows} >= new
    names = dict(con.execute("SELECT DISTINCT cluster, cluster_name FROM clusters WHERE scope = ?",
                             [derived.ALL_ACCOUNTS]).fetchall())
    assert len(names) == len({r[2] for r in before["clusters"]})  # no cluster added or renamed
    assert con.execute("SELECT count(DISTINCT sha256) FROM labels WHERE sha256 IN (SELECT unnest(?))",
                       [sorted(new)]).fetchone()[0] == 3
    # two accounts: the new account has clusters and a map of its own
    assert con.execute("SELECT count(*) FROM map WHERE scope = ?", [B]).fetchone()[0] == 3


def test_a_grown_library_or_refit_fits_anew(two_accounts):
    cfg, _, _ = two_accounts
    first = len(demo.scenes()) + len(demo.texts())  # the demo's images: every file is another picture
    assert analyse.analyse(cfg, None).note == "up to date"  # 3 new of 34: below the share
    model = catalog.meta(catalog.connect(cfg.data_dir))["clip_model"]
    assert fits.load(cfg.data_dir, "clusters", derived.ALL_ACCOUNTS, model).meta["images"] == first
    grown = analyse.analyse(cfg.replace("analysis", refit_growth=0.05), None)
    assert f"clusters fitted (grew from {first} images" in grown.note and grown.done == first + 3
    assert fits.load(cfg.data_dir, "clusters", derived.ALL_ACCOUNTS, model).meta["images"] == first + 3
    refit = analyse.analyse(cfg, None, refit=True)
    assert "clusters fitted (refit asked" in refit.note and "labels fitted" in refit.note


def test_a_renamed_cluster_keeps_its_name_as_images_come_and_on_refit(ingested_sample, tmp_path, capsys):
    from clipgram.cli import main

    data = tmp_path / "data"
    shutil.copytree(ingested_sample.data_dir, data)
    cfg = ingested_sample.replace("data", dir=str(data))
    base = ["--data-dir", str(data), "--clip-model", "tiny", "--captioner", "tiny", "--device", "cpu"]
    with catalog.connect(data) as con:
        cluster, size = con.execute("SELECT cluster, count(*) FROM clusters WHERE scope = ? GROUP BY 1 "
                                    "ORDER BY 2 DESC LIMIT 1", [derived.ALL_ACCOUNTS]).fetchone()
    assert main(["clusters", "--rename", str(cluster), "my favourites", *base]) == 0
    assert main(["clusters", "--rename", "99", "nothing", *base]) == 2
    assert "no cluster 99 in all accounts" in capsys.readouterr().err

    def named() -> dict[str, int]:
        with catalog.connect(data) as con:
            return dict(con.execute("SELECT cluster_name, count(*) FROM clusters WHERE scope = ? GROUP BY 1",
                                    [derived.ALL_ACCOUNTS]).fetchall())
    assert named()["my favourites"] == size
    assert "fitted" in analyse.analyse(cfg, None, refit=True).note
    assert named().get("my favourites", 0) >= size - 1  # the same images, give or take one, under its name


def test_names_read_the_labels_of_sets_the_library_speaks_of_only(ingested_sample):
    from clipgram.analysis import clusters

    data = ingested_sample.data_dir
    with catalog.connect(data) as con:
        model = catalog.meta(con)["clip_model"]
        best = dict(con.execute("SELECT sha256, label FROM labels WHERE label_set = 'colour' AND rank = 1").fetchall())
    shas = sorted(best)
    docs = clusters.documents(data, shas, model)
    # the demo's captions name colours and shapes, never a posture: "posture" is not read
    assert not any({"standing", "lying"} & set(doc.split()) for doc in docs)
    assert all(best[sha] in doc.split()[-2:] for sha, doc in zip(shas, docs))  # its shape and colour labels


def test_a_deleted_result_is_computed_again(ingested_sample, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(ingested_sample.data_dir, data)
    cfg = ingested_sample.replace("data", dir=str(data))
    with catalog.connect(data) as con:
        model = catalog.meta(con)["clip_model"]
    derived.LABELS.file(data, "shape", model).unlink()
    result = analyse.analyse(cfg, None)
    assert "labels fitted (shape)" in result.note
    assert derived.LABELS.file(data, "shape", model).exists()
