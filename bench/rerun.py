"""`python -m bench.rerun`: how long a rerun takes when nothing has changed.

An account of 1,000 images (a folder source) is ingested through the Prefect
flow, then ingested again. The second run has nothing to do: every stage after
the folder scan finds its inputs unchanged in the runs ledger and is skipped,
and no model is loaded. `noop_stages_s` is the time the second run's stages
took by the ledger; `noop_s` is the whole flow call, Prefect's own work
included. The offline models do the first run (trained on first use): the
rerun's cost does not depend on the model. Results merge into
bench/results.json under "rerun".
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import save_section
from clipgram import synthetic, tables
from clipgram.config import load_config

ACCOUNT = "bench-rerun"


def _settings(data_dir: Path) -> dict[str, Any]:
    # short top-k captions keep the first run short on a CPU; the rerun skips captioning anyway.
    # OCR off: reading 1,000 pictures of shapes would be most of the first run (bench.ocr has its own)
    return load_config(overrides={
        "data": {"dir": str(data_dir)}, "models": {"clip": "tiny", "captioner": "tiny"},
        "caption": {"generation": "top_k", "max_length": 6}, "ocr": {"enabled": False}}, environ={}).as_dict()


def run(images: int = 1000, side: int = 96) -> dict[str, Any]:
    from clipgram.flows.ingest import ingest_account  # Prefect is slow to import: only when run

    with tempfile.TemporaryDirectory(prefix="clipgram-bench-rerun-") as work:
        source = Path(work) / ACCOUNT
        source.mkdir()
        for i in range(images):
            rng = random.Random(i)
            picture = synthetic.render(rng.choice(synthetic.all_scenes()), side, rng)
            picture.save(source / f"img{i:05d}.jpg", quality=90)
        settings = _settings(Path(work) / "data")
        timings = {}
        for attempt in ("first", "noop"):
            start = time.perf_counter()
            ingest_account(ACCOUNT, settings, source=str(source))
            timings[attempt] = time.perf_counter() - start
        con = tables.connect(Path(work) / "data")
        stages = con.execute("""
            SELECT stage, status, epoch(finished_at - started_at) FROM runs
            WHERE run_id = (SELECT arg_max(run_id, started_at) FROM runs) ORDER BY started_at""").fetchall()
    return {"images": images, "first_s": timings["first"], "noop_s": timings["noop"],
            "noop_stages_s": sum(seconds for _, _, seconds in stages),
            "noop_stages": {stage: status for stage, status, _ in stages}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    args = parser.parse_args(argv)
    save_section(args.out, "rerun", run(args.images))


if __name__ == "__main__":
    main()
