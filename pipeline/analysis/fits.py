"""What an analysis learned from the images it saw, kept so that the next run only places new ones.

A fit (cluster centres and names, the map's projection, label vectors) is one small Parquet
file per (analysis, scope, model): `tables/fits/scope=<scope>/<analysis>-<model>.parquet`, one
row holding its settings and counts as JSON and each array as .npy bytes. Parquet, so that an
object-store data dir carries it as it carries the derived tables (storage.pull fetches every
file that is not an append-only part, each time); it is not a catalog view.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipgram import tables

FITS_DIR = "fits"


@dataclass(frozen=True)
class Fit:
    meta: dict[str, Any]            # settings it was fitted with, image count, names…
    arrays: dict[str, np.ndarray]   # centres, projection axes, label vectors…


def path(data_dir: Path, analysis: str, scope: str, model: str) -> Path:
    return (data_dir / "tables" / FITS_DIR / f"scope={tables.check_partition_value(scope)}"
            / f"{analysis}-{tables.check_partition_value(model)}.parquet")


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def save(data_dir: Path, analysis: str, scope: str, model: str, fit: Fit) -> Path:
    final = path(data_dir, analysis, scope, model)
    final.parent.mkdir(parents=True, exist_ok=True)
    names = sorted(fit.arrays)
    row = pa.table({"meta": [json.dumps(fit.meta)], "arrays": [names],
                    "data": [[_npy(fit.arrays[n]) for n in names]]})
    return tables.write_atomically(row, final)


def load(data_dir: Path, analysis: str, scope: str, model: str) -> Fit | None:
    """The stored fit; None when there is none, or it cannot be read (it is then fitted anew)."""
    try:
        row = pq.read_table(path(data_dir, analysis, scope, model)).to_pylist()[0]
        arrays = {name: np.load(io.BytesIO(blob), allow_pickle=False)
                  for name, blob in zip(row["arrays"], row["data"])}
        return Fit(json.loads(row["meta"]), arrays)
    except (OSError, pa.ArrowException, ValueError, KeyError, IndexError):
        return None


def config_meta(config: dict | None) -> dict[str, Any]:
    """The settings the analyse stage fitted with, for its next run to compare; none for a fit
    a command made with settings asked for (stages/analyse.py keeps those)."""
    return {"config": config} if config else {}
