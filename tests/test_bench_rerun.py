"""The no-op rerun benchmark measures what it says: a second run that skips every stage."""

from bench import rerun as bench_rerun


def test_the_second_run_skips_every_stage_after_the_scan(prefect_harness, tiny_clip_ckpt, tiny_coca_ckpt):
    result = bench_rerun.run(images=6, side=48)
    assert result["images"] == 6
    assert result["noop_stages"] == {"scrape": "completed", "download": "skipped", "embed": "skipped", "ocr": "skipped",
                                     "caption": "skipped", "publish": "skipped",
                                     "analyse": "skipped"}
    assert 0 < result["noop_stages_s"] <= result["noop_s"]
