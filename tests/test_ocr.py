"""The OCR stage: a real model (PP-OCRv4, shipped in rapidocr-onnxruntime's wheel) reading real
images and rendered posters, its rows in the DAG's tables, and its text in SQL and search."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import random

import pytest
from PIL import Image

from clipgram import catalog, search, synthetic, tables
from clipgram.models import clip
from clipgram.models import ocr as ocr_model
from tests.realdata import sample_dir

pytest.importorskip("rapidocr_onnxruntime", reason="the OCR extra is not installed: pip install 'clipgram[ocr]'")

POSTER = ["JAZZ NIGHT", "Friday 14 March", "Harbour Hall"]


@pytest.fixture(scope="module")
def reader(make_config, tmp_path_factory):
    return ocr_model.from_config(make_config(tmp_path_factory.mktemp("ocr")).ocr)


def _read(reader, image: Image.Image) -> dict:
    return reader.read(reader.preprocess(image)[None])[0]


def test_reads_the_stated_text_of_real_images(reader):
    """Images from OCR projects' own test sets, whose text their sources state: the words come
    out (spaces the recogniser drops are split again for search), and boxes lie on the image."""
    root = sample_dir("ocr")
    stated = {row["file"]: row["text"] for row in csv.DictReader(open(root / "SOURCES.tsv"), delimiter="\t")}
    poster = "ocr/easyocr-examples/english.png"
    if poster not in stated:
        pytest.skip(f"{poster} is not among the samples")
    row = _read(reader, Image.open(root.parent / poster).convert("RGB"))
    words = set(ocr_model.search_words(row["text"]).casefold().split())
    for word in ("hands", "soap", "water", "coronavirus"):
        assert word in words, (word, row["text"])
    assert row["lines"] and all(0 <= v <= 1.01 for line in row["lines"] for v in line["box"])
    assert all(line["confidence"] >= reader.min_confidence for line in row["lines"])


def test_no_text_where_there_is_none(reader):
    rng = random.Random(4)
    scenes = [synthetic.render(scene, 320, rng) for scene in rng.sample(synthetic.all_scenes(), 4)]
    assert [_read(reader, image)["text"] for image in scenes] == ["", "", "", ""]


def test_lines_in_reading_order_and_run_together_words_split(reader):
    row = _read(reader, synthetic.poster(POSTER, 480, random.Random(1)))
    assert [line["text"].replace(" ", "").casefold() for line in row["lines"]] == \
        [line.replace(" ", "").casefold() for line in POSTER]
    assert {"jazz", "night", "harbour"} <= set(row["words"].casefold().split())


def test_search_words_keeps_the_run_and_adds_its_words():
    assert ocr_model.search_words("Cleanhandswithsoapandwater") == \
        "Cleanhandswithsoapandwater\nClean hands with soap and water"
    assert ocr_model.search_words("Friday 14 March") == "Friday 14 March"  # nothing run together
    assert ocr_model.search_words("愚园路 315") == "愚园路 315"


def _folder(tmp_path):
    root = tmp_path / "photos"
    root.mkdir(parents=True)
    rng = random.Random(2)
    synthetic.poster(POSTER, 480, rng).save(root / "p1.png")
    synthetic.poster(["OPENING HOURS", "Monday to Friday", "9 to 17"], 480, rng).save(root / "p2.png")
    for i, scene in enumerate(rng.sample(synthetic.all_scenes(), 3)):
        synthetic.render(scene, 320, rng).save(root / f"scene{i}.jpg")
    return root


def test_stage_in_the_dag_sql_and_search(prefect_harness, make_config, tmp_path):
    """A folder ingested by the flow: each image read once (in the embed stage's pass, its one
    decode), a rerun reads nothing, `images` has the text for SQL, and caption full-text search
    finds a poster by a word that is only in its image."""
    from clipgram.flows.ingest import ingest_account

    cfg, photos = make_config(tmp_path / "data"), str(_folder(tmp_path))
    results = {r.stage: r for r in ingest_account("photos", cfg.as_dict(), source=photos)}
    assert results["embed"].details["read for text"] == 5 and results["embed"].failed == 0
    assert results["ocr"].done == 0 and results["ocr"].note.startswith("nothing left")
    again = {r.stage: r for r in ingest_account("photos", cfg.as_dict(), source=photos)}
    assert again["ocr"].done == again["embed"].done == 0
    con = catalog.connect(cfg.data_dir)
    model = con.execute("SELECT value FROM clipgram_meta WHERE key = 'ocr'").fetchone()[0]
    assert model == ocr_model.model_id(cfg.ocr)
    parts = sorted((tables.OCR.dir(cfg.data_dir) / f"model={model}").glob("*.parquet"))
    assert con.execute(f"SELECT count(*), count(DISTINCT sha256) FROM read_parquet({[str(p) for p in parts]})"
                       ).fetchone() == (5, 5)  # no row written twice
    texts = dict(con.execute("SELECT post_caption, ocr_text FROM images").fetchall())
    assert texts["scene0.jpg"] == "" and "harbour" in texts["p1.png"].casefold()
    top = search.caption_search(con, cfg.data_dir, "opening hours", k=3)
    assert top and top[0].shortcode == con.execute(
        "SELECT shortcode FROM images WHERE post_caption = 'p2.png'").fetchone()[0]
    top = search.caption_search(con, cfg.data_dir, "jazz", k=3)  # read as JAZZNIGHT, split for search
    poster = con.execute("SELECT shortcode FROM images WHERE post_caption = 'p1.png'").fetchone()[0]
    assert [r.shortcode for r in top] == [poster]
    # words in the picture make it a match, whatever CLIP makes of the pixels; words it lacks do
    # not (the stand-in CLIP's own judgement of words it never trained on is another matter)
    _, hits = search.search(con, cfg.data_dir, [search.Term("text", "jazz night")], 5, "hybrid",
                            encoder=clip.from_config(cfg.models))
    assert [h.shortcode for h in hits if h.match][:1] == [poster]
    poster_hit = [h for h in hits if h.shortcode == poster]
    for query, legible in (("jazz night", True), ("jazz breakfast", False), ("night jazz", True)):
        found = search._words_in_picture(con, poster_hit, [search.Term("text", query)])
        assert (poster_hit[0].media_id in found) is legible, query
    stage_rows = {r["stage"]: r for r in _status(cfg)}
    assert (stage_rows["ocr"]["done"], stage_rows["ocr"]["pending"]) == (5, 0)
    _app_and_cli_filter_by_text(cfg, texts)


def _app_and_cli_filter_by_text(cfg, texts):
    """The app's image page shows the text; search filters to images with or without text, in
    the API and the CLI alike."""
    import httpx

    from clipgram.app import library, server
    from clipgram.cli import main

    con = catalog.connect(cfg.data_dir)
    media = dict(con.execute("SELECT post_caption, media_id FROM images").fetchall())
    with server.running(library.Library(cfg.data_dir, cfg.models)) as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        assert http.get(f"/api/image/{media['p1.png']}").json()["image"]["ocr_text"] == texts["p1.png"]
        found = {text: {r["post_caption"] for r in http.get("/api/search", params={
            "q": "a shape", "mode": "clip", "text": text}).json()["results"]} for text in ("with", "without")}
        assert found == {"with": {"p1.png", "p2.png"}, "without": {"scene0.jpg", "scene1.jpg", "scene2.jpg"}}
        assert http.get("/api/search", params={"q": "x", "text": "maybe"}).status_code == 422
    base = ["--data-dir", str(cfg.data_dir), "--clip-model", "tiny", "--captioner", "tiny", "--device", "cpu",
            "--json", "--mode", "clip"]
    shortcode = dict(con.execute("SELECT post_caption, shortcode FROM images").fetchall())
    for flag, names in (("--with-text", {"p1.png", "p2.png"}),
                        ("--without-text", {"scene0.jpg", "scene1.jpg", "scene2.jpg"})):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main(["search", "a shape", *base, flag]) == 0
        rows = json.loads(printed.getvalue()[printed.getvalue().index("["):])
        assert {r["shortcode"] for r in rows} == {shortcode[name] for name in names}


def _status(cfg):
    from clipgram import status

    meta = catalog.meta(catalog.connect(cfg.data_dir))
    return status.rows(cfg.data_dir, meta.get("clip_model"), meta.get("captioner"), meta.get("ocr"))


def test_turned_off_or_not_installed(prefect_harness, make_config, tmp_path, monkeypatch):
    """Off: the stage says so and the images have no text; not installed: it says how to
    install it and the rest of the run goes on."""
    from clipgram.flows.ingest import ingest_account

    cfg = make_config(tmp_path / "off", ocr={"enabled": False})
    results = {r.stage: r for r in ingest_account("photos", cfg.as_dict(), source=str(_folder(tmp_path)))}
    assert results["ocr"].note == "off ([ocr] enabled = false)"
    con = catalog.connect(cfg.data_dir)
    assert con.execute("SELECT count(*), count(ocr_text) FROM images").fetchone() == (5, 0)
    monkeypatch.setattr(ocr_model, "installed_version", lambda: None)
    cfg = make_config(tmp_path / "missing")
    results = {r.stage: r for r in ingest_account("photos", cfg.as_dict(), source=str(_folder(tmp_path / "m")))}
    assert results["ocr"].note == f"not installed: {ocr_model.INSTALL}"
    assert results["publish"].done == 5
