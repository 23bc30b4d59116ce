"""Derived tables: results computed from stored embeddings, rewritten whole per scope and model.

Unlike the append-only source tables, a derived result (the labels of one label
set, the clusters of one account) replaces its previous version. Each (scope,
model) pair is one file, `tables/<name>/<scope column>=<scope>/<model>.parquet`,
replaced with a single atomic rename: a reader sees the old result or the new
one, never a mix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipgram import storage, tables
from clipgram.errors import ClipgramError

ALL_ACCOUNTS = "_all_accounts"  # scope of results computed across every account


class AnalysisError(ClipgramError, ValueError):
    """An analysis cannot run on what the library holds (too few images, no such cluster)."""


def scope_label(scope: str) -> str:
    """What a person reads for a scope of the derived tables: never its internal name."""
    return "all accounts" if scope == ALL_ACCOUNTS else f"@{scope}"


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


MAX_INCREMENTS = 16  # files appended to one result before they are folded into it


def _increments(final: Path) -> list[Path]:
    # "~" cannot occur in a model name (tables.check_partition_value): no other result's file
    return sorted(final.parent.glob(f"{final.stem}~*.parquet"))


def _arrow(table: Derived, model: str, rows: Iterable[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([{**row, "model": model} for row in rows], schema=table.schema)


def replace(data_dir: Path, table: Derived, scope: str, model: str,
            rows: Iterable[dict[str, Any]]) -> Path:
    """Write `rows` as the whole result of (`scope`, `model`), replacing the previous one atomically.

    Its increments go first: a reader in between sees the previous result without its latest
    images, and a crash in between leaves those images for the next run to place again."""
    final = table.file(data_dir, scope, model)
    final.parent.mkdir(parents=True, exist_ok=True)
    storage.remove(_increments(final))
    return tables.write_atomically(_arrow(table, model, rows), final)


def append(data_dir: Path, table: Derived, scope: str, model: str,
           rows: Iterable[dict[str, Any]]) -> Path:
    """Add `rows` to the result of (`scope`, `model`) as a file of their own beside it (so a run
    that adds ten images writes ten images' rows, not the library's); every MAX_INCREMENTS
    files, they are folded into the result."""
    final = table.file(data_dir, scope, model)
    new = _arrow(table, model, rows)
    existing = _increments(final)
    if len(existing) + 1 >= MAX_INCREMENTS:
        whole = pa.concat_tables([pq.read_table(f, schema=table.schema) for f in [final, *existing]] + [new])
        return replace(data_dir, table, scope, model, whole.to_pylist())
    final.parent.mkdir(parents=True, exist_ok=True)
    return tables.write_atomically(new, final.with_name(f"{final.stem}~{time.time_ns():020d}.parquet"))


@dataclass(frozen=True)
class Delta:
    """How a scope's images differ from those a result covers."""
    new: list[int]   # positions (in the scope's Vectors) of the images it does not cover
    gone: bool       # it covers images no longer in the scope


def delta(data_dir: Path, table: Derived, scope: str, model: str, found: "Vectors") -> Delta | None:
    """What the result of (`scope`, `model`) lacks of `found`; None when there is no result."""
    final = table.file(data_dir, scope, model)
    if not final.exists():
        return None
    # read as dictionaries: a label result repeats each image once per label, its dictionary
    # does not; sets of strings stay in Arrow (100k images: milliseconds, not a Python set)
    dictionaries = [chunk.dictionary for f in [final, *_increments(final)]
                    for chunk in pq.read_table(f, columns=["sha256"], read_dictionary=["sha256"])
                    .column("sha256").chunks]
    covered = pc.unique(pa.concat_arrays(dictionaries)) if dictionaries else pa.array([], pa.string())
    missing = np.flatnonzero(~pc.is_in(found.sha_array, value_set=covered).to_numpy(zero_copy_only=False))
    return Delta(missing.tolist(), len(covered) > len(found.shas) - len(missing))


def read(data_dir: Path, table: Derived, scope: str, model: str, columns: list[str],
         filters: list[tuple] | None = None) -> list[dict[str, Any]]:
    """The rows of the result of (`scope`, `model`), increments included, those matching
    `filters` (pyarrow's) when given; [] when there is none."""
    final = table.file(data_dir, scope, model)
    if not final.exists():
        return []
    return [row for f in [final, *_increments(final)]
            for row in pq.read_table(f, columns=columns, filters=filters).to_pylist()]


def view_sql(table: Derived, data_dir: Path, root: str, model: str | None) -> str:
    """A SELECT over every scope of `table` for `model`, typed even when nothing was written yet."""
    if model and any((data_dir / "tables" / table.name).glob("*/*.parquet")):
        return (f"SELECT * FROM read_parquet('{root}/tables/{table.name}/*/*.parquet', "
                f"hive_partitioning = true, hive_types = {{'{table.scope}': VARCHAR}}) "
                f"WHERE model = '{tables.check_partition_value(model)}'")
    duck = {pa.string(): "VARCHAR", pa.float32(): "FLOAT", pa.int32(): "INTEGER"}
    columns = [f"NULL::{duck[f.type]} AS {f.name}" for f in table.schema]
    return f"SELECT {', '.join(columns)}, NULL::VARCHAR AS {table.scope} WHERE false"


@dataclass(frozen=True)
class Vectors:
    """The embedded images of a scope, one row each (by sha256), over the published vector index."""
    shas: list[str]
    rows: np.ndarray     # their rows in `matrix`
    matrix: np.ndarray   # the catalog's memory-mapped index: every image of the library
    sha_array: pa.Array  # `shas` as Arrow, for set operations at library size

    def of(self, which: np.ndarray | list[int] | None = None) -> np.ndarray:
        """(n, d) float32 unit vectors of all images, or of those at positions `which`."""
        rows = self.rows if which is None else self.rows[np.asarray(which, dtype=np.int64)]
        return np.asarray(self.matrix[rows], dtype=np.float32)


def vectors(data_dir: Path, model: str, account: str | None = None) -> Vectors:
    """The stored vectors of `account`'s images (every account's when None), one per image.

    Read from the vector index publish writes (a memory-mapped matrix), not from Parquet:
    analysis never re-encodes an image, and at 100k images it reads in milliseconds.
    """
    from clipgram import catalog, search  # both import this module

    with catalog.connect(data_dir) as con:  # closed: a connection left open pins this catalog
        published = catalog.meta(con).get("clip_model")
        if published != model:
            raise search.SearchError(f"the catalog is published with {published or 'no CLIP model'}, "
                                     f"not {model}: run `clipgram ingest` with that model first")
        found = con.execute("""
            SELECT r.sha256, min(r.row) AS row FROM search_rows r
            WHERE $account IS NULL OR r.media_id IN (SELECT media_id FROM documents WHERE account = $account)
            GROUP BY r.sha256 ORDER BY r.sha256""", {"account": account}).to_arrow_table()
        matrix = search.VectorIndex.open(con, data_dir).matrix if found.num_rows else np.zeros((0, 1), np.float32)
    shas = found.column("sha256").combine_chunks()
    return Vectors(shas.to_pylist(), found.column("row").to_numpy().astype(np.int64), matrix, shas)

