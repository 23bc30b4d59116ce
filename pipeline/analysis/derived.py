"""Derived tables: results computed from stored embeddings, rewritten whole per scope and model.

Unlike the append-only source tables, a derived result (the labels of one label
set, the clusters of one account) replaces its previous version. Each (scope,
model) pair is one file, `tables/<name>/<scope column>=<scope>/<model>.parquet`,
replaced with a single atomic rename: a reader sees the old result or the new
one, never a mix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from clipgram import tables

ALL_ACCOUNTS = "_all_accounts"  # scope of results computed across every account


@dataclass(frozen=True)
class Derived:
    name: str
    scope: str              # hive partition column: what one result covers
    schema: pa.Schema       # columns stored in the files (model included)

    def file(self, data_dir: Path, scope: str, model: str) -> Path:
        return (data_dir / "tables" / self.name / f"{self.scope}={tables.check_partition_value(scope)}"
                / f"{tables.check_partition_value(model)}.parquet")


LABELS = Derived("labels", "label_set", pa.schema([
    ("model", pa.string()), ("sha256", pa.string()), ("label", pa.string()),
    ("score", pa.float32()),     # softmax over the set's labels (CLIP's logit scale)
    ("cosine", pa.float32()),    # raw similarity of image and label prompt embeddings
    ("rank", pa.int32()),        # 1 = the image's best label in this set
]))
CLUSTERS = Derived("clusters", "scope", pa.schema([
    ("model", pa.string()), ("sha256", pa.string()), ("cluster", pa.int32()),
    ("cluster_name", pa.string()), ("similarity", pa.float32()),  # cosine to the cluster centre
    ("silhouette", pa.float32()),  # of the whole clustering, repeated on every row
]))
MAP = Derived("map", "scope", pa.schema([
    ("model", pa.string()), ("sha256", pa.string()), ("x", pa.float32()), ("y", pa.float32()),
    ("method", pa.string()),
]))
DUPLICATES = Derived("duplicates", "scope", pa.schema([
    ("model", pa.string()), ("group_id", pa.int32()), ("kind", pa.string()),  # exact | near
    ("media_id", pa.string()), ("account", pa.string()), ("sha256", pa.string()),
    ("similarity", pa.float32()),  # cosine to the group's first image
]))
ALL_DERIVED = (LABELS, CLUSTERS, MAP, DUPLICATES)


def replace(data_dir: Path, table: Derived, scope: str, model: str,
            rows: Iterable[dict[str, Any]]) -> Path:
    """Write `rows` as the whole result of (`scope`, `model`), replacing the previous one atomically."""
    final = table.file(data_dir, scope, model)
    final.parent.mkdir(parents=True, exist_ok=True)
    arrow = pa.Table.from_pylist([{**row, "model": model} for row in rows], schema=table.schema)
    return tables.write_atomically(arrow, final)


def view_sql(table: Derived, data_dir: Path, root: str, model: str | None) -> str:
    """A SELECT over every scope of `table` for `model`, typed even when nothing was written yet."""
    if model and any((data_dir / "tables" / table.name).glob("*/*.parquet")):
        return (f"SELECT * FROM read_parquet('{root}/tables/{table.name}/*/*.parquet', "
                f"hive_partitioning = true, hive_types = {{'{table.scope}': VARCHAR}}) "
                f"WHERE model = '{tables.check_partition_value(model)}'")
    duck = {pa.string(): "VARCHAR", pa.float32(): "FLOAT", pa.int32(): "INTEGER"}
    columns = [f"NULL::{duck[f.type]} AS {f.name}" for f in table.schema]
    return f"SELECT {', '.join(columns)}, NULL::VARCHAR AS {table.scope} WHERE false"


def stored_vectors(data_dir: Path, model: str, account: str | None = None
                   ) -> tuple[list[str], np.ndarray]:
    """(sha256s, unit vectors) of the downloaded images of `account` (all when None) as stored.

    Reads the embeddings table itself: analysis never re-encodes an image.
    """
    con = tables.connect(data_dir)
    emb = tables.latest_sql(tables.EMBEDDINGS, data_dir, str(data_dir), model)
    where = "WHERE m.account = ?" if account else ""
    rows = con.execute(f"""
        SELECT e.sha256, e.embedding FROM ({emb}) e
        WHERE e.embedding IS NOT NULL AND e.sha256 IN (SELECT m.sha256 FROM media m {where} {'AND' if where else 'WHERE'} m.status = 'done')
        ORDER BY e.sha256""", [account] if account else []).fetchall()
    if not rows:
        return [], np.zeros((0, 0), dtype=np.float32)
    return [r[0] for r in rows], np.asarray([r[1] for r in rows], dtype=np.float32)
