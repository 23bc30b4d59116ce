"""`python -m bench.startup`: how long a fresh `clipgram` process takes to answer.

The demo's library is built once in a temporary directory (`clipgram demo`), then each
command runs `--repeats` times as a new process, and the median wall time is reported,
beside `python -c "import duckdb"` measured the same way in the same run: the floor any
command that opens the catalog pays. `sql` and `status` load no model; `search` loads the
CLIP model once. Results merge into bench/results.json under "startup".
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import save_section

CLIPGRAM = [sys.executable, "-m", "clipgram.cli"]
COMMANDS = {
    "sql_s": ["sql", "SELECT 1"],
    "status_s": ["status"],
    "search_s": ["search", "a red square", "-k", "5"],
}


def _median_s(argv: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(repeats: int = 3) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="clipgram-bench-startup-") as work:
        data = str(Path(work) / "data")
        # no OCR: none of the commands timed reads text, and it would only lengthen the set-up
        subprocess.run([*CLIPGRAM, "demo", "--data-dir", data], check=True, cwd=work,
                       env={**os.environ, "CLIPGRAM_OCR_ENABLED": "false"},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        results: dict[str, Any] = {
            "import_duckdb_s": _median_s([sys.executable, "-c", "import duckdb"], repeats)}
        for name, command in COMMANDS.items():
            results[name] = _median_s([*CLIPGRAM, command[0], "--data-dir", data, *command[1:]], repeats)
        results["repeats"] = repeats
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    args = parser.parse_args(argv)
    save_section(args.out, "startup", run(args.repeats))


if __name__ == "__main__":
    main()
