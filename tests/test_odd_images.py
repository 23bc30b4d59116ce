"""Odd, broken and exotic image files from image libraries' test suites (tests/SAMPLES.md),
ingested as a folder: each is one media row, done with an embedding, a caption and its text read
(or a row saying why not) or failed with a reason, and nothing stops the stage. The list is tests/image_sample.txt; `make bench` ingests
the whole corpus."""

import pytest
from realdata import sample_dir

from bench import odd_images as bench_odd_images
from clipgram import images
from clipgram.sources import folder


@pytest.fixture(scope="module")
def report(make_config, tmp_path_factory):
    corpus = sample_dir("images")
    tmp = tmp_path_factory.mktemp("odd")
    copied = bench_odd_images.copy_listed(corpus, bench_odd_images.SAMPLE_LIST, tmp / "odd")
    cfg = make_config(tmp / "data")
    return bench_odd_images.ingest(cfg, copied, "odd"), copied


def test_every_odd_file_is_one_row_done_or_failed_with_a_reason(report):
    result, _ = report
    assert result["files"] > 50
    assert result["media_rows"] == result["files"] == result["done"] + result["failed"]
    assert result["failed_without_reason"] == 0
    assert result["done"] > 20 and result["failed"] > 10  # the list holds both kinds


def test_every_file_that_verifies_is_embedded_captioned_and_read(report):
    result, _ = report
    assert result["embedded"] == result["captioned"] == result["done"]
    # the OCR engine reads each one, or records why not; none is left pending
    assert result["ocr_read"] + result["ocr_failed"] == result["done"] and result["ocr_read"] > 0


def test_a_second_ingest_adds_nothing(report):
    assert report[0]["rows_added_by_second_ingest"] == 0


def test_what_verifies_decodes_for_the_model_in_every_mode(report):
    _, copied = report
    files, _ = folder.image_files(copied)
    modes = set()
    for path in files:
        try:
            images.verify(path)
        except images.BadImage:
            continue
        assert images.load_rgb(path, min_side=224).mode == "RGB", path
        from PIL import Image
        with Image.open(path) as img:
            modes.add(img.mode)
    assert {"F", "I", "I;16", "CMYK", "LAB", "P", "1", "LA"} <= modes  # the sample spans them
