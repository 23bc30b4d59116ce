"""Odd, broken and exotic image files from other projects' test suites, ingested as a folder.

The corpus (2,600 files from Pillow, PngSuite, image-rs, libtiff, libjpeg-turbo, libavif,
libwebp, wuffs, OpenImageIO, openjpeg, … listed with their provenance in tests/SAMPLES.md)
is not in this repository: it lives in the steering repo's shared/samples/images, or where
CLIPGRAM_SAMPLES points. Every file with an extension Pillow reads must end as one media
row, done with an embedding and a caption or failed with a reason, within the per-file
decode deadline; a second ingest adds nothing. `make bench` and `make test` run the files in
tests/image_sample.txt, `python -m bench.odd_images` the whole corpus (minutes: opt-in).
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from clipgram import dag, tables
from clipgram.config import Config, load_config
from clipgram.sources import folder as folder_source

REPO = Path(__file__).resolve().parent.parent
SAMPLES = Path(os.environ.get("CLIPGRAM_SAMPLES") or REPO.parent / "shared" / "samples")
SAMPLE_LIST = REPO / "tests" / "image_sample.txt"
STAGES = dag.ordered(["scrape", "download", "embed", "caption", "ocr"])


def copy_listed(corpus: Path, listing: Path, dest: Path) -> Path:
    """The files `listing` names (paths relative to `corpus`, one a line), copied under `dest`."""
    for rel in listing.read_text().split("\n"):
        if rel.strip():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(corpus / rel, target)
    return dest


def failure_kind(error: str) -> str:
    """A failed row's reason without its details: what the report counts."""
    return error.split(":", 1)[0].strip()


def ingest(cfg: Config, folder: Path, account: str) -> dict[str, Any]:
    """Ingest `folder` twice (scrape → download → embed → caption → ocr) and report what became of it."""
    files, other = folder_source.image_files(folder)
    started = time.perf_counter()
    first = {stage.name: stage.run(cfg, account, (None, str(folder))) for stage in STAGES}
    seconds = time.perf_counter() - started
    con = tables.connect(cfg.data_dir)
    rows_after_first = con.execute("SELECT count(*) FROM media").fetchone()[0]
    for stage in STAGES:
        stage.run(cfg, account, (None, str(folder)))
    con = tables.connect(cfg.data_dir)
    done, failed, embedded, captioned, read, unread = con.execute("""
        SELECT count(*) FILTER (status = 'done'), count(*) FILTER (status = 'failed'),
               count(*) FILTER (status = 'done' AND sha256 IN (SELECT sha256 FROM embeddings)),
               count(*) FILTER (status = 'done' AND sha256 IN
                                (SELECT sha256 FROM captions WHERE error IS NULL)),
               count(*) FILTER (status = 'done' AND sha256 IN (SELECT sha256 FROM ocr WHERE error IS NULL)),
               count(*) FILTER (status = 'done' AND sha256 IN (SELECT sha256 FROM ocr WHERE error IS NOT NULL))
        FROM media WHERE account = ?""", [account]).fetchone()
    reasons = [r[0] for r in con.execute(
        "SELECT error FROM media WHERE account = ? AND status = 'failed'", [account]).fetchall()]
    return {
        "files": len(files), "files_without_image_extension": other,
        "media_rows": con.execute("SELECT count(*) FROM media WHERE account = ?", [account]).fetchone()[0],
        "done": done, "failed": failed, "failed_without_reason": sum(not r for r in reasons),
        "embedded": embedded, "captioned": captioned, "ocr_read": read, "ocr_failed": unread,
        "with_text": con.execute("SELECT count(*) FROM ocr WHERE text <> ''").fetchone()[0],
        "rows_added_by_second_ingest": con.execute("SELECT count(*) FROM media").fetchone()[0]
        - rows_after_first,
        "failure_kinds": dict(Counter(failure_kind(r or "") for r in reasons).most_common()),
        "first_ingest_s": round(seconds, 1),
        "stages": {stage: f"{r.done} done, {r.failed} failed" for stage, r in first.items()},
    }


def run(data_dir: Path, whole: bool = False) -> dict[str, Any] | None:
    """The files tests/image_sample.txt lists (`whole`: the whole corpus, 2,600 files, opt-in:
    `python -m bench.odd_images`), ingested as one folder with the offline models; None when
    the corpus is absent."""
    corpus = SAMPLES / "images"
    if not corpus.is_dir():
        return None
    cfg = load_config(overrides={"data": {"dir": str(data_dir / "data")},
                                 "models": {"clip": "tiny", "captioner": "tiny"}})
    folder = corpus if whole else copy_listed(corpus, SAMPLE_LIST, data_dir / "listed")
    return {"corpus": "whole" if whole else SAMPLE_LIST.name, **ingest(cfg, folder, "odd-images")}


def main(argv: list[str] | None = None) -> None:
    import argparse
    import tempfile

    from bench import save_section

    parser = argparse.ArgumentParser(description="the whole odd-image corpus, ingested twice")
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="clipgram-bench-odd-") as work:
        save_section(args.out, "odd_images", run(Path(work), whole=True))


if __name__ == "__main__":
    main()
