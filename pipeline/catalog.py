"""The DuckDB catalog: views over the Parquet tables, a full-text index, SQL helpers.

`data/catalog.duckdb` holds views over *relative* Parquet globs, so the data
directory can move. clipgram opens it with `file_search_path` set to the data
directory; from a plain DuckDB shell, start it inside the data directory:
`cd data && duckdb catalog.duckdb`.

Vectors are stored in Parquet as lists; the `embeddings` view casts them back to
FLOAT[d] so `array_cosine_similarity` works directly. DuckDB's FTS index does
not see rows added after it is built, so `publish` rebuilds it every time.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import duckdb

from pipeline import tables
from pipeline.stages import StageResult

CATALOG = "catalog.duckdb"


class CatalogMissing(FileNotFoundError):
    pass


def load_extension(con: duckdb.DuckDBPyConnection, name: str) -> None:
    """LOAD an extension from its PyPI package (DuckDB's extension server is not needed)."""
    package = importlib.import_module(f"duckdb_extension_{name}")
    version = duckdb.__version__
    path = Path(package.__file__).parent / "extensions" / f"v{version}" / f"{name}.duckdb_extension"
    if not path.exists():
        raise RuntimeError(f"{path} missing: install duckdb-extension-{name}=={version}")
    con.execute(f"LOAD '{path}'")


def _view_sql(data_dir: Path, clip_id: str | None, dim: int | None,
              captioner_id: str | None) -> dict[str, str]:
    root = "."
    views = {
        "posts": tables.latest_sql(tables.POSTS, data_dir, root),
        "media": tables.latest_sql(tables.MEDIA, data_dir, root),
        "profiles": tables.latest_sql(tables.PROFILES, data_dir, root),
        "embeddings": (
            f"SELECT sha256, model, embedding::FLOAT[{dim}] AS embedding "
            f"FROM ({tables.scan_sql(tables.EMBEDDINGS, data_dir, root, clip_id)})"
            if clip_id else tables.scan_sql(tables.EMBEDDINGS, data_dir, root, "none")),
        "captions": (
            "SELECT sha256, model, caption FROM "
            f"({tables.scan_sql(tables.CAPTIONS, data_dir, root, captioner_id or 'none')}) "
            "WHERE error IS NULL"),
        "runs": tables.latest_sql(tables.RUNS, data_dir, root),  # the stage ledger, for history
    }
    # one row per downloaded image with everything a user asks about
    views["images"] = """
        SELECT m.account, m.media_id, m.shortcode, m.position, m.sha256, m.path, m.width, m.height,
               m.is_video, p.taken_at, p.caption AS post_caption, p.hashtags, p.mentions, p.likes,
               p.comments, p.permalink, p.accessibility_caption, c.caption AS generated_caption
        FROM media m
        JOIN posts p USING (account, shortcode)
        LEFT JOIN captions c USING (sha256)
        WHERE m.status = 'done'"""
    return views


def _fingerprint(data_dir: Path, *ids: Any) -> str:
    """Identifies what a catalog is built from: every Parquet part and the model ids."""
    parts = sorted(str(p.relative_to(data_dir)) for p in (data_dir / "tables").rglob("*.parquet"))
    return hashlib.sha256(json.dumps([parts, *ids]).encode()).hexdigest()


def _published_fingerprint(path: Path) -> str | None:
    try:
        with duckdb.connect(str(path), read_only=True) as con:
            return meta(con).get("fingerprint")
    except duckdb.Error:
        return None


def publish(data_dir: Path, clip_id: str | None, dim: int | None,
            captioner_id: str | None, account: str = "*") -> StageResult:
    """Rebuild catalog.duckdb (views, search documents, FTS index) and swap it in atomically.

    Skipped when no table part and no model changed since the last publish.
    """
    final = data_dir / CATALOG
    fingerprint = _fingerprint(data_dir, clip_id, dim, captioner_id)
    if final.exists() and _published_fingerprint(final) == fingerprint:
        return StageResult("publish", account, note="catalog up to date").log()
    tmp = data_dir / f".{CATALOG}.tmp"
    tmp.unlink(missing_ok=True)
    con = duckdb.connect(str(tmp))
    try:
        con.execute(f"SET file_search_path = '{data_dir}'")
        for name, sql in _view_sql(data_dir, clip_id, dim, captioner_id).items():
            con.execute(f"CREATE VIEW {name} AS {sql}")
        con.execute("CREATE TABLE clipgram_meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
        con.executemany("INSERT INTO clipgram_meta VALUES (?, ?)", [
            ["clip_model", clip_id], ["clip_dim", str(dim) if dim else None],
            ["captioner", captioner_id], ["fingerprint", fingerprint]])
        # FTS indexes tables, not views: materialise one document per image
        con.execute("""
            CREATE TABLE documents AS
            SELECT media_id, account, sha256,
                   coalesce(generated_caption, '') AS generated_caption,
                   coalesce(post_caption, '') AS post_caption,
                   array_to_string(hashtags, ' ') AS hashtags,
                   coalesce(accessibility_caption, '') AS accessibility_caption
            FROM images""")
        load_extension(con, "fts")
        con.execute("PRAGMA create_fts_index('documents', 'media_id', 'generated_caption', "
                    "'post_caption', 'hashtags', 'accessibility_caption', overwrite = 1)")
        documents = con.execute("SELECT count(*) FROM documents").fetchone()[0]
        con.execute("CHECKPOINT")
    finally:
        con.close()
    os.replace(tmp, final)
    (data_dir / f"{CATALOG}.wal").unlink(missing_ok=True)
    return StageResult("publish", account, done=documents, note="searchable images").log()


def connect(data_dir: Path, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """Open the catalog with paths resolving inside `data_dir` and the fts extension loaded."""
    path = data_dir / CATALOG
    if not path.exists():
        raise CatalogMissing(f"no catalog at {path}: run `clipgram ingest ACCOUNT` first "
                             f"(or pass --data-dir to the directory that holds it)")
    con = duckdb.connect(str(path), read_only=read_only)
    con.execute(f"SET file_search_path = '{data_dir}'")
    load_extension(con, "fts")
    return con


def meta(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    return dict(con.execute("SELECT key, value FROM clipgram_meta").fetchall())


def register_udfs(con: duckdb.DuckDBPyConnection, encoder: Any) -> None:
    """`clip_text(text)` → FLOAT[d], the CLIP embedding of `text`, for plain-SQL vector search."""
    @lru_cache(maxsize=256)  # DuckDB may call a scalar UDF once per row, even for a constant
    def clip_text(text: str) -> list[float]:
        return encoder.encode_text([text])[0].tolist()

    con.create_function("clip_text", clip_text, [duckdb.sqltype("VARCHAR")],
                        duckdb.sqltype(f"FLOAT[{encoder.dim}]"), side_effects=False)
