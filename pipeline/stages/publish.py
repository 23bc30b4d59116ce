"""Publish stage: catalog.duckdb rebuilt from the tables and swapped in atomically.

The catalog's views and macros are `catalog`'s; this stage materialises what they
cannot be: one search document per image with its full-text index, and the vector
matrix search memory-maps. DuckDB's FTS index does not see rows added after it is
built, so publish rebuilds it every time something changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from clipgram import ann, catalog, storage, tables
from clipgram.lock import catalog_lock
from clipgram.result import StageResult
from clipgram.search import write_matrix

INDEX_DIR = "index"
log = logging.getLogger("clipgram")


def _write_vector_index(con: duckdb.DuckDBPyConnection, data_dir: Path, fingerprint: str,
                        clip_id: str | None, dim: int | None, ann_threshold: int | None,
                        previous: dict[str, Any]) -> tuple[str | None, str | None]:
    """Materialise the searchable vectors: `search_rows` (row → media_id), a float32 .npy
    matrix and, from `ann_threshold` rows, the approximate index (ann.py): their paths.

    Search memory-maps the matrix instead of scanning Parquet (about 8× faster);
    publish rewrites it whenever a table part changes, so it is never stale. An image keeps
    the row the `previous` catalog gave it and new images come after, so that a publish that
    adds images only appends rows. The approximate index is named by the rows and model it
    holds: kept while they do not change, extended when rows were only appended.
    """
    con.execute(f"""CREATE TABLE search_rows AS
                    SELECT (row_number() OVER (ORDER BY p.row NULLS LAST, i.media_id) - 1)::INTEGER AS row,
                           i.media_id, i.sha256
                    FROM images i JOIN embeddings e USING (sha256)
                    LEFT JOIN ({_previous_rows(con, data_dir)}) p USING (media_id, sha256)""")
    con.execute("DETACH DATABASE IF EXISTS previous")
    if not dim:
        return None, None
    relative = f"{INDEX_DIR}/{fingerprint[:16]}.npy"
    count = con.execute("SELECT count(*) FROM search_rows").fetchone()[0]
    reader = con.execute("""SELECT e.embedding FROM search_rows r JOIN embeddings e USING (sha256)
                            ORDER BY r.row""")
    write_matrix(data_dir / relative, count, dim, reader.to_arrow_reader(65536))
    if ann_threshold is None or count < ann_threshold:
        return relative, None
    approximate = _ann_name(con, count, clip_id)
    if (data_dir / approximate).exists():
        return relative, approximate
    started = time.perf_counter()
    matrix = np.load(data_dir / relative, mmap_mode="r")
    earlier = previous.get("ann_index") if previous.get("clip_model") == clip_id else None
    held = ann.extendable(data_dir / earlier, count) if earlier else None
    if held is not None and _ann_name(con, held, clip_id) == earlier:  # the same images in its rows
        ann.extend(data_dir / earlier, matrix, data_dir / approximate)
        log.info("approximate index extended by %d images in %.1f s", count - held, time.perf_counter() - started)
    else:
        ann.build(matrix, data_dir / approximate)
        log.info("approximate index of %d images built in %.0f s", count, time.perf_counter() - started)
    return relative, approximate


def _previous_rows(con: duckdb.DuckDBPyConnection, data_dir: Path) -> str:
    """A query of the published catalog's (row, media_id, sha256), attached as `previous`;
    of no rows when there is none that reads."""
    try:
        path = str(data_dir / catalog.CATALOG).replace("'", "''")
        con.execute(f"ATTACH '{path}' AS previous (READ_ONLY)")
        con.execute("SELECT row, media_id, sha256 FROM previous.search_rows LIMIT 0")
        return "SELECT row, media_id, sha256 FROM previous.search_rows"
    except duckdb.Error:  # none yet, torn, or one without vectors
        con.execute("DETACH DATABASE IF EXISTS previous")
        return "SELECT NULL::INTEGER AS row, NULL::VARCHAR AS media_id, NULL::VARCHAR AS sha256 LIMIT 0"


def _ann_name(con: duckdb.DuckDBPyConnection, rows: int, clip_id: str | None) -> str:
    """The approximate index's path for the first `rows` rows: named by which image is in
    which row, as a sum of per-row hashes (one string of every row would be 800 MB at 10M)."""
    holds = con.execute("SELECT count(*), sum(hash(row, media_id, sha256)) FROM search_rows WHERE row < ?",
                        [rows]).fetchone()
    return f"{INDEX_DIR}/{hashlib.sha256(f'{holds}|{clip_id}'.encode()).hexdigest()[:16]}{ann.SUFFIX}"


def _drop_stale_indexes(data_dir: Path, keep: set[str | None]) -> None:
    kept = {data_dir / k for k in keep if k}
    for path in (*(data_dir / INDEX_DIR).glob("*.npy"), *(data_dir / INDEX_DIR).glob(f"*{ann.SUFFIX}")):
        if path not in kept:
            path.unlink(missing_ok=True)  # readers that mapped it keep their copy until closed


def _building(data_dir: Path) -> Path:
    """Where publish builds the new catalog, to rename it into place whole."""
    return data_dir / f".{catalog.CATALOG}.tmp"


def _drop_leftovers(data_dir: Path) -> None:
    """What a publish killed midway left (under the catalog lock, no publish is running): its
    half-built catalog and the temp files of the index it was writing."""
    building = _building(data_dir)
    for path in (building, building.with_name(f"{building.name}.wal"), *(data_dir / INDEX_DIR).glob(".*.tmp")):
        path.unlink(missing_ok=True)


def _fingerprint(data_dir: Path, *ids: Any) -> str:
    """Identifies what a catalog is built from: every Parquet part and the model ids."""
    return tables.fingerprint(data_dir, ["**/*.parquet"], *ids)


def _published(data_dir: Path) -> dict[str, Any]:
    """The published catalog's clipgram_meta; empty when there is none (or it is not one)."""
    try:
        with duckdb.connect(str(data_dir / catalog.CATALOG), read_only=True) as con:
            return catalog.meta(con)
    except duckdb.Error:
        return {}


def publish(data_dir: Path, clip_id: str | None, dim: int | None,
            captioner_id: str | None, account: str = "*", force: bool = False,
            quiet: bool = False, ann_threshold: int | None = None, ocr_id: str | None = None) -> StageResult:
    """Rebuild catalog.duckdb (views, search documents, FTS index) and swap it in atomically.

    Skipped when no table part and no model changed since the last publish. `quiet`: no log
    line (a stage that publishes on the way says so itself). `ann_threshold`: from how many
    images to build the approximate index too (None: never). `ocr_id`: the OCR model whose
    text the images show and search finds (None: none).
    """
    with catalog_lock(data_dir):
        fingerprint = _fingerprint(data_dir, clip_id, dim, captioner_id, catalog.layout(), ann_threshold, ocr_id)
        previous = _published(data_dir)
        if not force and previous.get("fingerprint") == fingerprint:
            result = StageResult("publish", account, note="catalog up to date")
            return result if quiet else result.log()
        _drop_leftovers(data_dir)
        documents, index, approximate = _build(data_dir, fingerprint, clip_id, dim, captioner_id, ann_threshold,
                                               ocr_id, previous)
        os.replace(_building(data_dir), data_dir / catalog.CATALOG)
        (data_dir / f"{catalog.CATALOG}.wal").unlink(missing_ok=True)
        # the replaced catalog's index files stay one more generation: a reader that opened it
        # just before the swap reads the files it names a moment later
        _drop_stale_indexes(data_dir, {index, approximate, previous.get("vector_index"), previous.get("ann_index")})
        _write_models(data_dir, {"clip_model": clip_id, "clip_dim": dim, "captioner": captioner_id,
                                 "ann_threshold": ann_threshold, "ocr": ocr_id})
    result = StageResult("publish", account, done=documents, note="searchable images")
    return result if quiet else result.log()


def _build(data_dir: Path, fingerprint: str, clip_id: str | None, dim: int | None, captioner_id: str | None,
           ann_threshold: int | None, ocr_id: str | None, previous: dict[str, Any]
           ) -> tuple[int, str | None, str | None]:
    """The new catalog, built at `.catalog.duckdb.tmp`: its documents' count and the paths of
    the vector index files it names. When it fails the half-built file goes, the published
    catalog stays."""
    tmp = _building(data_dir)
    con = duckdb.connect(str(tmp))
    try:
        con.execute(f"SET file_search_path = '{data_dir}'")
        for name, sql in catalog.view_sql(data_dir, clip_id, dim, captioner_id, ocr_id=ocr_id).items():
            con.execute(f"CREATE VIEW {name} AS {sql}")
        index, approximate = _write_vector_index(con, data_dir, fingerprint, clip_id, dim, ann_threshold, previous)
        con.execute("CREATE TABLE clipgram_meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
        con.executemany("INSERT INTO clipgram_meta VALUES (?, ?)", [
            ["clip_model", clip_id], ["clip_dim", str(dim) if dim else None],
            ["captioner", captioner_id], ["ocr", ocr_id], ["fingerprint", fingerprint], ["vector_index", index],
            ["ann_index", approximate], ["layout", catalog.layout()]])
        # FTS indexes tables, not views: materialise one document per image
        con.execute("""
            CREATE TABLE documents AS
            SELECT i.media_id, i.account, i.sha256,
                   coalesce(i.generated_caption, '') AS generated_caption,
                   coalesce(i.post_caption, '') AS post_caption,
                   array_to_string(i.hashtags, ' ') AS hashtags,
                   coalesce(i.accessibility_caption, '') AS accessibility_caption,
                   coalesce(o.words, '') AS ocr_text  -- run-together words split (ocr.search_words)
            FROM images i LEFT JOIN ocr o USING (sha256)""")
        catalog.load_extension(con, "fts")
        con.execute("PRAGMA create_fts_index('documents', 'media_id', 'generated_caption', "
                    "'post_caption', 'hashtags', 'accessibility_caption', 'ocr_text', overwrite = 1)")
        for macro in catalog.MACROS:
            con.execute(macro)
        documents = con.execute("SELECT count(*) FROM documents").fetchone()[0]
        con.execute("CHECKPOINT")
    except BaseException:  # a full disk, say: the half-built catalog goes, the published one stays
        con.close()
        for leftover in (tmp, tmp.with_name(f"{tmp.name}.wal")):
            leftover.unlink(missing_ok=True)
        raise
    finally:
        con.close()
    return documents, index, approximate


def _write_models(data_dir: Path, models: dict[str, Any]) -> None:
    final = data_dir / catalog.MODELS_FILE
    if not final.exists() or json.loads(final.read_text()) != models:
        storage.write_text(final, json.dumps(models))


def upgrade(data_dir: Path) -> None:
    """Republish a catalog that another version of clipgram built (its views and macros are
    not this one's), once, at the first command that opens it; else nothing."""
    published = _published(data_dir)
    if published and published.get("layout") != catalog.layout():  # none: the command says what to do
        log.info("the catalog was built by another version of clipgram: publishing it again")
        republish(data_dir, force=True)  # its fingerprint may not say so: it was computed otherwise


def republish(data_dir: Path, account: str = "*", force: bool = False, quiet: bool = False) -> StageResult:
    """Publish again with the models last published (after a derived table changed, or on a
    machine whose mirror of an object-store data dir has no catalog yet)."""
    if (data_dir / catalog.MODELS_FILE).exists():
        models = json.loads((data_dir / catalog.MODELS_FILE).read_text())
    else:  # a catalog published before MODELS_FILE existed
        with catalog.connect(data_dir) as con:
            models = catalog.meta(con)
    dim = models.get("clip_dim")
    return publish(data_dir, models.get("clip_model"), int(dim) if dim else None,
                   models.get("captioner"), account, force, quiet, models.get("ann_threshold"),
                   models.get("ocr"))
