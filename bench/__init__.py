"""Benchmarks, outside the shipped package: `make bench` runs them all (`python -m bench`) and
writes bench/results.json.

- throughput.py  download, verify, decode, embed and caption rates (the `make bench` driver)
- search.py      text→image top-k over stored vectors (`python -m bench.search`)
- rerun.py       a no-op rerun of a 1,000-image account (`python -m bench.rerun`)
- odd_images.py  the real odd and broken image corpus ingested as a folder
- startup.py     a fresh `clipgram` process answering sql, status and search (`python -m bench.startup`)
"""

import json
from pathlib import Path
from typing import Any


def save_section(out: Path, section: str, result: dict[str, Any]) -> None:
    """Print `result` and store it as `section` of the results file, keeping the other sections."""
    print(json.dumps(result, indent=2))
    results = json.loads(out.read_text()) if out.exists() else {}
    results[section] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
