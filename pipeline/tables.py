"""Table schemas and atomic Parquet I/O.

Tables are append-only sets of Parquet parts under
`tables/<name>/<partition>=<value>/part-*.parquet`. A row that changes (a media
item going from pending to downloaded) is written again with a newer
`updated_at`; readers take the latest row per key. Appending instead of
rewriting is what makes every write a single atomic rename: a killed run
leaves either the whole part or nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from clipgram import doctor, storage

TS = pa.timestamp("us", tz="UTC")
STALE_TEMP_S = 3600  # a hidden temp file this old was left by a killed run (writes take seconds)
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._@+-]*$")  # no "..", no hidden dirs


@dataclass(frozen=True)
class Table:
    name: str
    partition: str          # hive partition column, not stored inside the files
    key: tuple[str, ...]    # identifies a row; the latest `updated_at` wins
    schema: pa.Schema       # columns stored in the files

    def dir(self, data_dir: Path) -> Path:
        return data_dir / "tables" / self.name

    def parts(self, value: str | None = None) -> str:
        """Glob of the parts, relative to the table's directory."""
        return f"{self.partition}={value if value is not None else '*'}/*.parquet"


POSTS = Table("posts", "account", ("account", "shortcode"), pa.schema([
    ("shortcode", pa.string()),
    ("post_id", pa.int64()),
    ("owner_username", pa.string()),
    ("owner_id", pa.int64()),
    ("taken_at", TS),
    ("caption", pa.string()),
    ("hashtags", pa.list_(pa.string())),
    ("mentions", pa.list_(pa.string())),
    ("tagged_users", pa.list_(pa.string())),
    ("location", pa.string()),
    ("likes", pa.int64()),
    ("comments", pa.int64()),
    ("is_video", pa.bool_()),
    ("typename", pa.string()),
    ("permalink", pa.string()),
    ("accessibility_caption", pa.string()),
    ("media_count", pa.int32()),
    ("updated_at", TS),
]))

MEDIA = Table("media", "account", ("account", "media_id"), pa.schema([
    ("media_id", pa.string()),          # <shortcode>_<position>
    ("shortcode", pa.string()),
    ("position", pa.int32()),           # order inside a carousel, 0 otherwise
    ("url", pa.string()),
    ("is_video", pa.bool_()),           # the image is a video's thumbnail
    ("video_url", pa.string()),         # the video itself, when is_video
    ("status", pa.string()),            # pending | done | failed
    ("error", pa.string()),
    ("sha256", pa.string()),
    ("path", pa.string()),              # relative to the data dir
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("bytes", pa.int64()),
    ("video_sha256", pa.string()),      # the video file, when fetched (--videos)
    ("video_path", pa.string()),
    ("updated_at", TS),
]))

# One row per account and scrape that changed it. `synced_through` is the scrape
# cursor: every post up to that time (down to the first run's --since/--limit
# bound) is in the tables; a run cut short by rate limits leaves it unchanged.
PROFILES = Table("profiles", "account", ("account",), pa.schema([
    ("profile_id", pa.int64()),
    ("username", pa.string()),
    ("full_name", pa.string()),
    ("biography", pa.string()),
    ("followers", pa.int64()),
    ("followees", pa.int64()),
    ("post_count", pa.int64()),
    ("is_private", pa.bool_()),
    ("profile_pic_url", pa.string()),
    ("synced_through", TS),
    ("updated_at", TS),
]))

EMBEDDINGS = Table("embeddings", "model", ("model", "sha256"), pa.schema([
    ("sha256", pa.string()),
    ("embedding", pa.list_(pa.float32())),  # NULL when the image could not be embedded:
    ("error", pa.string()),                 # … and why
    ("updated_at", TS),
]))

CAPTIONS = Table("captions", "model", ("model", "sha256"), pa.schema([
    ("sha256", pa.string()),
    ("caption", pa.string()),
    ("error", pa.string()),
    ("updated_at", TS),
]))

# The stage ledger: one row per attempt of a stage, written when it starts
# (status running) and again when it ends (completed or failed).
RUNS = Table("runs", "account", ("account", "attempt_id"), pa.schema([
    ("attempt_id", pa.string()),        # one attempt of one stage
    ("run_id", pa.string()),            # the flow run (Prefect's id when there is one)
    ("stage", pa.string()),
    ("status", pa.string()),            # running | completed | skipped | failed
    ("started_at", TS),
    ("finished_at", TS),
    ("done", pa.int64()),
    ("failed", pa.int64()),
    ("error", pa.string()),
    ("note", pa.string()),
    ("inputs", pa.string()),            # fingerprint of the stage's inputs when it finished
    ("host", pa.string()),
    ("pid", pa.int64()),
    ("updated_at", TS),
]))

# the text an OCR model read in an image: its lines in reading order, each with its box
# (4 corners, x then y, as fractions of the image's width and height) and confidence
OCR_LINE = pa.struct([("text", pa.string()), ("box", pa.list_(pa.float32(), 8)),
                      ("confidence", pa.float32())])
OCR = Table("ocr", "model", ("model", "sha256"), pa.schema([
    ("sha256", pa.string()),
    ("text", pa.string()),              # the lines joined by newlines; '' when it found none
    ("words", pa.string()),             # what full-text search indexes: the text, and the words of
                                        # its run-together Latin letters (ocr.search_words)
    ("lines", pa.list_(OCR_LINE)),
    ("languages", pa.list_(pa.string())),  # what the model reads (ISO 639-1)
    ("error", pa.string()),
    ("updated_at", TS),
]))

ALL_TABLES = (POSTS, MEDIA, EMBEDDINGS, CAPTIONS, OCR, PROFILES, RUNS)


def now() -> datetime:
    return datetime.now(timezone.utc)


def check_partition_value(value: str) -> str:
    if not _SAFE_VALUE.match(value):
        raise ValueError(f"{value!r} cannot name a partition: use letters, digits and . _ @ + -")
    return value


def post_row(**fields: Any) -> dict[str, Any]:
    """A `posts` row: every column of POSTS, None where `fields` has no value; TypeError naming
    a field POSTS has no column for. Every source builds its posts rows here."""
    unknown = set(fields) - set(POSTS.schema.names)
    if unknown:
        raise TypeError(f"posts has no column {', '.join(sorted(unknown))}")
    return {name: fields.get(name) for name in POSTS.schema.names if name != "updated_at"}


def media_row(shortcode: str, position: int, url: str | None, *, is_video: bool = False,
              video_url: str | None = None, error: str | None = None) -> dict[str, Any]:
    """A new `media` row for item `position` of a post: pending, or failed with `error` when its
    URL cannot be fetched. Every source builds its media rows here; download fills in the rest."""
    return {"media_id": f"{shortcode}_{position}", "shortcode": shortcode, "position": position,
            "url": url, "is_video": is_video, "video_url": video_url,
            "status": "failed" if error else "pending", "error": error}


def write_part(data_dir: Path, table: Table, value: str, rows: Iterable[dict[str, Any]]) -> Path | None:
    """Write `rows` as one new part of `table` in partition `value`, atomically.

    Returns the part's path, or None when there were no rows (nothing is written).
    """
    stamp = now()  # the write time orders versions of a row
    rows = [{**row, "updated_at": stamp} for row in rows]
    if not rows:
        return None
    arrow = pa.Table.from_pylist(rows, schema=table.schema)
    directory = table.dir(data_dir) / f"{table.partition}={check_partition_value(value)}"
    directory.mkdir(parents=True, exist_ok=True)
    name = f"part-{stamp:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.parquet"
    return write_atomically(arrow, directory / name)


def write_atomically(arrow: pa.Table, final: Path) -> Path:
    """Write `arrow` to the Parquet file `final`: a temp file, fsync, rename, fsync of the directory.

    The temp name is hidden and not *.parquet, so no reader's glob sees a half-written file.
    """
    with storage.replacing(final) as tmp, open(tmp, "wb") as f:  # the store's copy first, if any
        pq.write_table(arrow, f, compression="zstd")
        f.flush()
        os.fsync(f.fileno())
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return final


def remove_stale_temp_files(directory: Path, pattern: str = "**/.*.tmp") -> int:
    """Delete the temp files (hidden, `.tmp`) under `directory` that killed runs left behind."""
    cutoff = time.time() - STALE_TEMP_S
    removed = 0
    for tmp in directory.glob(pattern):
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:  # its writer finished it meanwhile
            continue
    return removed


_DUCK_TYPES = {pa.string(): "VARCHAR", pa.int64(): "BIGINT", pa.int32(): "INTEGER", pa.bool_(): "BOOLEAN",
               pa.float32(): "FLOAT", TS: "TIMESTAMPTZ"}


def _duck_type(arrow: pa.DataType) -> str:
    """DuckDB's name for a column type of the schemas above (lists and structs of them too)."""
    if isinstance(arrow, pa.FixedSizeListType):
        return f"{_duck_type(arrow.value_type)}[{arrow.list_size}]"
    if isinstance(arrow, pa.ListType):
        return f"{_duck_type(arrow.value_type)}[]"
    if isinstance(arrow, pa.StructType):
        return f"STRUCT({', '.join(f'{f.name} {_duck_type(f.type)}' for f in arrow)})"
    return _DUCK_TYPES[arrow]


def scan_sql(table: Table, data_dir: Path, root: str, value: str | None = None) -> str:
    """A SELECT over every part of `table` (or one partition), typed even when empty.

    `data_dir` is where files are looked for now; `root` is how the SQL names it
    (an absolute path, or "." for views resolved against the data directory).
    """
    pattern = f"{root}/tables/{table.name}/{table.parts(value)}"
    columns = [f"NULL::{_duck_type(f.type)} AS {f.name}" for f in table.schema]
    columns.append(f"NULL::VARCHAR AS {table.partition}")
    empty = f"SELECT {', '.join(columns)} WHERE false"
    if any(table.dir(data_dir).glob(table.parts(value))):
        # by name with the empty table: a column added since older parts were written is there, NULL
        return (
            f"(SELECT * FROM read_parquet('{pattern}', hive_partitioning = true, "
            f"hive_types = {{'{table.partition}': VARCHAR}}, union_by_name = true)) "
            f"UNION ALL BY NAME ({empty})"
        )
    return empty  # read_parquet fails on a glob with no files: an empty table of the right shape


def latest_sql(table: Table, data_dir: Path, root: str, value: str | None = None) -> str:
    """Like scan_sql, keeping only the newest row per key."""
    keys = ", ".join(table.key)
    return (
        f"SELECT * FROM ({scan_sql(table, data_dir, root, value)}) "
        f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY updated_at DESC) = 1"
    )


def fingerprint(data_dir: Path, globs: Iterable[str], *settings: Any) -> str:
    """Identifies what is stored under `globs` (relative to tables/), with `settings`.

    Parts are immutable once renamed into place, so their names change exactly
    when the data does: the names are enough, no file is read.
    """
    root = data_dir / "tables"
    parts = sorted(str(p.relative_to(root)) for g in globs for p in root.glob(g))
    return hashlib.sha256(json.dumps([parts, settings], default=str).encode()).hexdigest()


def rows(con: duckdb.DuckDBPyConnection, table: Table, condition: str,
         params: list[Any]) -> list[dict[str, Any]]:
    """The current rows of `table` matching `condition` (a WHERE clause, may end in ORDER BY),
    with the stored columns but `updated_at`: ready to be changed and written again."""
    columns = ", ".join(f.name for f in table.schema if f.name != "updated_at")
    return con.execute(f"SELECT {columns} FROM {table.name} WHERE {condition}",
                       params).to_arrow_table().to_pylist()


def connect(data_dir: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory connection with the current state of every table as a view.

    Stages read through this rather than catalog.duckdb, so they never contend
    for the catalog's file lock with a user's open SQL shell.
    """
    con = duckdb.connect()
    root = str(data_dir)
    with doctor.naming_unreadable():  # a view reads each part's footer: a torn part fails here
        for table in ALL_TABLES:
            con.execute(f"CREATE VIEW {table.name} AS {latest_sql(table, data_dir, root)}")
    return con
