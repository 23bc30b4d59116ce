"""The DuckDB catalog: views over the Parquet tables, a full-text index, SQL helpers.

`data/catalog.duckdb` holds views over *relative* Parquet globs, so the data
directory can move. clipgram opens it with `file_search_path` set to the data
directory; from a plain DuckDB shell, start it inside the data directory:
`cd data && duckdb catalog.duckdb`.

Vectors are stored in Parquet as lists; the `embeddings` view casts them back to
FLOAT[d] so `array_cosine_similarity` works directly. DuckDB's FTS index does
not see rows added after it is built, so the publish stage (`stages/publish.py`) rebuilds
it every time.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from clipgram import storage, tables
from clipgram.analysis import derived
from clipgram.errors import ClipgramError

CATALOG = "catalog.duckdb"
# the snapshot's tables, with the columns a request looks rows up by: an index on each makes a
# lookup of one page of results a few index probes instead of a scan of every image
SNAPSHOT_TABLES = {"images": ("media_id",), "search_rows": ("row", "media_id"), "media": ()}
CATALOG_NAME = "catalog"  # its database name: the file's stem, and the name a snapshot attaches it by
# The models the catalog was last published with. Beside the data, not in the catalog: a
# machine mirroring an object-store data dir builds its own catalog from it (storage.py)
MODELS_FILE = "catalog.json"


class CatalogMissing(ClipgramError, FileNotFoundError):
    pass


def load_extension(con: duckdb.DuckDBPyConnection, name: str) -> None:
    """LOAD an extension from its PyPI package (DuckDB's extension server is not needed)."""
    package = importlib.import_module(f"duckdb_extension_{name}")
    version = duckdb.__version__
    path = Path(package.__file__).parent / "extensions" / f"v{version}" / f"{name}.duckdb_extension"
    if not path.exists():
        raise RuntimeError(f"{path} missing: install duckdb-extension-{name}=={version}")
    con.execute(f"LOAD '{path}'")


def view_sql(data_dir: Path, clip_id: str | None, dim: int | None,
             captioner_id: str | None, root: str = ".", *, ocr_id: str | None = None) -> dict[str, str]:
    """The catalog's views; `root` is how their SQL names the data directory (see tables.scan_sql)."""
    views = {
        "posts": tables.latest_sql(tables.POSTS, data_dir, root),
        "media": tables.latest_sql(tables.MEDIA, data_dir, root),
        "profiles": tables.latest_sql(tables.PROFILES, data_dir, root),
        "embeddings": (
            f"SELECT sha256, model, embedding::FLOAT[{dim}] AS embedding "
            f"FROM ({tables.scan_sql(tables.EMBEDDINGS, data_dir, root, clip_id)}) "
            "WHERE embedding IS NOT NULL"
            if clip_id else tables.scan_sql(tables.EMBEDDINGS, data_dir, root, "none")),
        "captions": (
            "SELECT sha256, model, caption FROM "
            f"({tables.scan_sql(tables.CAPTIONS, data_dir, root, captioner_id or 'none')}) "
            "WHERE error IS NULL"),
        "ocr": (
            "SELECT sha256, model, text, words, lines, languages FROM "
            f"({tables.scan_sql(tables.OCR, data_dir, root, ocr_id or 'none')}) "
            "WHERE error IS NULL"),
        "runs": tables.latest_sql(tables.RUNS, data_dir, root),  # the stage ledger, for history
    }
    # one row per downloaded image with everything a user asks about
    views["images"] = """
        SELECT m.account, m.media_id, m.shortcode, m.position, m.sha256, m.path, m.width, m.height,
               m.is_video, p.taken_at, p.caption AS post_caption, p.hashtags, p.mentions, p.likes,
               p.comments, p.permalink, p.accessibility_caption, c.caption AS generated_caption,
               o.text AS ocr_text
        FROM media m
        JOIN posts p USING (account, shortcode)
        LEFT JOIN captions c USING (sha256)
        LEFT JOIN ocr o USING (sha256)
        WHERE m.status = 'done'"""
    for table in derived.ALL_DERIVED:  # zero-shot labels, clusters, map, duplicates
        views[table.name] = derived.view_sql(table, data_dir, root, clip_id)
    return views


# Macros that need no model, kept in the catalog file: plain `duckdb catalog.duckdb` has them too.
MACROS = [
    # images most like a stored one (image → image), the image itself left out
    """CREATE MACRO similar_to(id, k) AS TABLE
       SELECT i.*, array_cosine_similarity(e.embedding, q.embedding) AS score
       FROM images i JOIN embeddings e USING (sha256),
            (SELECT e2.embedding FROM images i2 JOIN embeddings e2 USING (sha256)
             WHERE i2.media_id = id) q
       WHERE i.media_id != id
       ORDER BY score DESC, i.media_id LIMIT k""",
    # BM25 as the fts extension's match_bm25 computes it (k1 1.2, b 0.75, any word), but once
    # over the index's tables instead of once per document (a correlated subquery: 350 ms at
    # 100k documents): each (word, document)'s share of the score, for `words` (stemmed; NULL:
    # every word, which the app keeps in memory: search.TextIndex) ...
    """CREATE MACRO bm25_terms(words) AS TABLE
       WITH tf AS (SELECT t.docid, t.termid, count(*) AS tf
                   FROM fts_main_documents.terms t JOIN fts_main_documents.dict d USING (termid)
                   WHERE words IS NULL OR list_contains(words, d.term) GROUP BY ALL)
       SELECT dict.term, docs.name AS media_id,
              log((s.num_docs - dict.df + 0.5) / (dict.df + 0.5) + 1)
              * tf.tf * 2.2 / (tf.tf + 1.2 * (0.25 + 0.75 * docs.len / s.avgdl)) AS score
       FROM tf JOIN fts_main_documents.docs docs USING (docid)
            JOIN fts_main_documents.dict dict USING (termid), fts_main_documents.stats s""",
    # ... the words of a query as the index stems them ...
    """CREATE MACRO bm25_words(q) AS
       (SELECT list(DISTINCT stem(w, 'porter')) FROM unnest(fts_main_documents.tokenize(q)) AS u(w))""",
    # ... and (media_id, score) of every document matching a word of q
    """CREATE MACRO bm25(q) AS TABLE
       SELECT media_id, sum(score) AS score FROM bm25_terms(bm25_words(q)) GROUP BY media_id""",
    # BM25 over generated captions, post captions, hashtags, alt text and the text in the image
    """CREATE MACRO search_captions(q, k) AS TABLE
       SELECT i.*, d.score FROM bm25(q) d JOIN images i USING (media_id)
       ORDER BY d.score DESC, i.media_id LIMIT k""",
]
# Macros over the CLIP UDFs: created per connection once `register_udfs` has made the UDFs.
# They rank with the vector index a search uses (clip_nearest: the exact scan, or the
# approximate index of a big library), not by scanning the embeddings' Parquet.
_UDF_MACROS = [
    """CREATE OR REPLACE TEMP MACRO search_text(q, k) AS TABLE
       SELECT i.*, h.score FROM (SELECT unnest(clip_nearest(clip_text(q), k), recursive := true)) h
       JOIN search_rows r USING (row) JOIN images i USING (media_id)
       ORDER BY h.score DESC, i.media_id LIMIT k""",
    """CREATE OR REPLACE TEMP MACRO search_image(file, k) AS TABLE
       SELECT i.*, h.score FROM (SELECT unnest(clip_nearest(clip_image(file), k), recursive := true)) h
       JOIN search_rows r USING (row) JOIN images i USING (media_id)
       ORDER BY h.score DESC, i.media_id LIMIT k""",
]

@lru_cache(maxsize=1)
def layout() -> str:
    """A digest of the SQL this version of clipgram builds a catalog with (its views and
    macros): publishing rebuilds a catalog built with other SQL though no table changed."""
    views = view_sql(Path("."), "model", 1, "captioner", ocr_id="ocr")
    return hashlib.sha256(json.dumps([views, MACROS, _UDF_MACROS]).encode()).hexdigest()[:16]


def existing(data_dir: Path) -> Path:
    """The catalog file of `data_dir`; raises CatalogMissing, saying what to do, when there is none."""
    path = data_dir / CATALOG
    if not path.exists():
        raise CatalogMissing(f"no catalog at {storage.remote_url(data_dir) or path}: "
                             "run `clipgram ingest ACCOUNT` first "
                             f"(or pass --data-dir to the directory that holds it)")
    return path


def connect(data_dir: Path, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """Open the catalog with paths resolving inside `data_dir` and the fts extension loaded."""
    con = duckdb.connect(str(existing(data_dir)), read_only=read_only)
    _session(con, data_dir)
    load_extension(con, "fts")
    return con


def snapshot(data_dir: Path) -> duckdb.DuckDBPyConnection:
    """The catalog as published now, read-only, for a process that outlives publishes (the app).

    DuckDB keeps one database instance per file per process, so connecting again after a
    publish would see the old catalog as long as any connection to it is open. Here each
    snapshot is an in-memory database of its own with the catalog file attached, and the
    views every search reads row by row (SNAPSHOT_TABLES) are computed once, into tables of
    that database: a view recomputes its Parquet joins at each query.
    """
    path = str(existing(data_dir)).replace("'", "''")
    con = duckdb.connect()
    load_extension(con, "fts")
    con.execute(f"ATTACH '{path}' AS {CATALOG_NAME} (READ_ONLY)")
    _session(con, data_dir)
    present = {name for name, in con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_catalog = ?", [CATALOG_NAME]).fetchall()}
    for name in sorted(set(SNAPSHOT_TABLES) & present):  # no search_rows without a vector index
        con.execute(f"CREATE TABLE memory.main.{name} AS FROM {CATALOG_NAME}.main.{name}")
        for column in SNAPSHOT_TABLES[name]:
            con.execute(f"CREATE INDEX {name}_{column} ON memory.main.{name} ({column})")
    return con


def snapshot_cursor(con: duckdb.DuckDBPyConnection, data_dir: Path) -> duckdb.DuckDBPyConnection:
    """A cursor of a snapshot, for another thread: its tables first, then the catalog's."""
    cur = cursor(con, data_dir)
    cur.execute(f"SET search_path = 'memory.main,{CATALOG_NAME}.main,{CATALOG_NAME}.fts_main_documents'")
    return cur


def _session(con: duckdb.DuckDBPyConnection, data_dir: Path) -> None:
    # settings that belong to one connection or cursor: where the views' relative globs
    # resolve, and the catalog as the default database (a snapshot's is attached)
    con.execute(f"SET file_search_path = '{data_dir}'")
    con.execute(f"USE {CATALOG_NAME}")


def cursor(con: duckdb.DuckDBPyConnection, data_dir: Path) -> duckdb.DuckDBPyConnection:
    """A cursor of a catalog connection, for another thread, set up the same way."""
    cur = con.cursor()
    _session(cur, data_dir)
    return cur


def meta(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    return dict(con.execute("SELECT key, value FROM clipgram_meta").fetchall())


# The encoder the SQL UDFs use, as a loader called at their first call: a query that calls
# no CLIP function never loads a model. Connections to one file in one process share one DuckDB
# database and its UDFs, so the functions are registered once and look the loader up here.
_UDF_ENCODER: dict[str, Callable[[], Any]] = {}  # model id → loader (which loads once)
_UDF_INDEX: dict[str, Any] = {}  # model id → the catalog's search.VectorIndex


@lru_cache(maxsize=256)  # DuckDB may call a scalar UDF once per row, even for a constant
def _encode_text(model: str, text: str) -> list[float]:
    return _UDF_ENCODER[model]().encode_text([text])[0].tolist()


@lru_cache(maxsize=64)
def _encode_image(model: str, path: str) -> list[float]:
    from clipgram import images

    encoder = _UDF_ENCODER[model]()
    pixels = encoder.preprocess(images.load_rgb(Path(path).expanduser())).unsqueeze(0)
    return encoder.encode_images(pixels)[0].tolist()


# Module-level, so they live as long as the process: DuckDB keeps only a borrowed reference
# to a UDF, which must outlive every connection of the database it was registered on.
def clip_text(text: str) -> list[float]:
    return _encode_text(next(iter(_UDF_ENCODER)), text)


def clip_image(path: str) -> list[float]:
    return _encode_image(next(iter(_UDF_ENCODER)), path)


def clip_nearest(vector: list[float], k: int) -> list[dict[str, Any]]:
    rows, scores = _UDF_INDEX[next(iter(_UDF_INDEX))].top(np.asarray(vector, dtype=np.float32), int(k))
    return [{"row": int(r), "score": float(s)} for r, s in zip(rows, scores)]


def register_udfs(con: duckdb.DuckDBPyConnection, model: str, dim: int,
                  load: Callable[[], Any], index: Any) -> None:
    """CLIP in plain SQL: `clip_text(text)` and `clip_image(path)` → FLOAT[dim] unit vectors,
    `clip_nearest(vector, k)` → the k nearest [{row, score}] of `index` (the catalog's
    search.VectorIndex), and the table macros `search_text(q, k)` and `search_image(path, k)`
    built on them. `load()` gives the encoder of `model`; it is called when a query first needs it."""
    _UDF_ENCODER.clear()
    _UDF_ENCODER[model] = load
    _UDF_INDEX.clear()
    _UDF_INDEX[model] = index
    vector = duckdb.sqltype(f"FLOAT[{dim}]")
    nearest = duckdb.list_type(duckdb.struct_type({"row": "INTEGER", "score": "FLOAT"}))
    for function, args, returns in ((clip_text, ["VARCHAR"], vector), (clip_image, ["VARCHAR"], vector),
                                    (clip_nearest, [vector, "INTEGER"], nearest)):
        try:
            con.create_function(function.__name__, function, [duckdb.sqltype(str(a)) for a in args], returns,
                                side_effects=False)
        except duckdb.CatalogException:
            pass  # registered by an earlier connection of this process to the same database
    for macro in _UDF_MACROS:
        con.execute(macro)
