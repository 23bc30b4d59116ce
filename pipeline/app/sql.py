"""Read-only SQL over the library, for the app started with `--allow-sql`.

Statements run in a sandbox: an in-memory database with the catalog attached read-only
and the catalog's views rebuilt over the data directory's absolute path, after which
DuckDB's external access is turned off with only the data directory readable (no other
file, no ATTACH, no extension loading) and the configuration is locked, so no statement
can turn it back on. Only SELECT and EXPLAIN statements run: a COPY ... TO inside the data
directory would otherwise still be a write. Rows are capped and a timer interrupts a
statement that runs too long.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from clipgram import catalog, search
from clipgram.errors import ClipgramError

READ_STATEMENTS = (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN)


class SqlRefused(ClipgramError):
    """A statement the sandbox does not run (not a read, or more than one)."""


class SqlTimeout(ClipgramError):
    pass


@dataclass(frozen=True)
class Limits:
    rows: int = 1000
    timeout_s: float = 10.0


@dataclass(frozen=True)
class Answer:
    columns: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool  # more rows than Limits.rows: the rest were not fetched
    elapsed_ms: float


class Sandbox:
    """One published catalog, opened for untrusted read-only SQL; one statement at a time
    (the CLIP macros are per connection, so requests share this one)."""

    def __init__(self, data_dir: Path, load_encoder: Callable[[], Any], limits: Limits):
        self.limits = limits
        self._lock = threading.Lock()
        self._con = _open(data_dir.resolve(), load_encoder)

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def run(self, sql: str) -> Answer:
        statements = self._con.extract_statements(sql)  # raises duckdb.ParserException
        if len(statements) != 1:
            raise SqlRefused(f"send one statement at a time ({len(statements)} given)")
        if statements[0].type not in READ_STATEMENTS:
            raise SqlRefused(f"only SELECT (and EXPLAIN) statements run here, not "
                             f"{statements[0].type.name}: the library is read-only")
        with self._lock:
            timer = threading.Timer(self.limits.timeout_s, self._con.interrupt)
            started = time.perf_counter()
            timer.start()
            try:
                result = self._con.execute(statements[0].query)
                rows = result.fetchmany(self.limits.rows + 1)
            except duckdb.InterruptException:
                raise SqlTimeout(f"the statement ran past {self.limits.timeout_s:g} s and was "
                                 "stopped: narrow it (a WHERE, a LIMIT)") from None
            finally:
                timer.cancel()
            columns = [d[0] for d in result.description or []]
        return Answer(columns, rows[:self.limits.rows], len(rows) > self.limits.rows,
                      (time.perf_counter() - started) * 1000)


def _open(data_dir: Path, load_encoder: Callable[[], Any]) -> duckdb.DuckDBPyConnection:
    path = str(catalog.existing(data_dir)).replace("'", "''")
    con = duckdb.connect()
    catalog.load_extension(con, "fts")
    con.execute(f"ATTACH '{path}' AS {catalog.CATALOG_NAME} (READ_ONLY)")
    con.execute(f"USE {catalog.CATALOG_NAME}")
    stored = catalog.meta(con)
    con.execute("USE memory")
    clip_id, dim = stored.get("clip_model"), stored.get("clip_dim")
    root = str(data_dir).replace("'", "''")
    # the catalog's own views name the data directory relatively, which the access check
    # below refuses; the same views over its absolute path come first on the search path
    for name, view in catalog.view_sql(data_dir, clip_id, int(dim) if dim else None,
                                       stored.get("captioner"), root, ocr_id=stored.get("ocr")).items():
        con.execute(f"CREATE VIEW {name} AS {view}")
    con.execute(f"SET search_path = 'memory.main,{catalog.CATALOG_NAME}.main,"
                f"{catalog.CATALOG_NAME}.fts_main_documents'")
    if clip_id and dim:  # their macros read the catalog's search_rows: after the search path
        catalog.register_udfs(con, clip_id, int(dim), load_encoder, search.VectorIndex.of(stored, data_dir))
    con.execute(f"SET allowed_directories = ['{root}/']")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con
