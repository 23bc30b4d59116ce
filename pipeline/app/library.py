"""The library the app serves: the published catalog, reopened when a new one is published.

Publishing replaces catalog.duckdb atomically (a new file renamed over the old one), so a
new inode or mtime means a new generation: the connection and the vector index are
reopened then, and never in the middle of a request. Nothing here writes, but for a catalog
that another version of clipgram built: it is published again once, when the app starts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb

from clipgram import catalog, search
from clipgram.app import sql
from clipgram.config import ModelSettings
from clipgram.stages import publish

if TYPE_CHECKING:
    from clipgram.models import clip


@dataclass(frozen=True)
class Generation:
    """One published catalog: its connection and its BM25 index in memory."""
    stamp: tuple[int, int]
    con: duckdb.DuckDBPyConnection
    text: search.TextIndex


class Library:
    def __init__(self, data_dir: Path, models: ModelSettings, sql_limits: sql.Limits | None = None):
        self.data_dir = data_dir
        self.models = models
        self.sql_limits = sql_limits  # None: no SQL served
        self._lock = threading.Lock()
        self._current: Generation | None = None
        self._sandbox: tuple[tuple[int, int], sql.Sandbox] | None = None
        self._model_lock = threading.Lock()
        self._encoder = None

    def _stamp(self) -> tuple[int, int]:
        stat = (self.data_dir / catalog.CATALOG).stat()
        return stat.st_ino, stat.st_mtime_ns

    def generation(self) -> Generation:
        """The newest published catalog (raises catalog.CatalogMissing before the first)."""
        try:
            stamp = self._stamp()
        except FileNotFoundError:
            catalog.snapshot(self.data_dir)  # raises with the message that says what to do
            raise
        with self._lock:
            if self._current is None or self._current.stamp != stamp:
                if self._current is None:  # a library older than this app: its catalog rebuilt once
                    publish.upgrade(self.data_dir)
                    stamp = self._stamp()
                con = catalog.snapshot(self.data_dir)
                self._current = Generation(stamp, con, search.TextIndex.build(con))
            return self._current

    def close(self) -> None:
        """Let go of the catalog (its file stays open while a connection is): the next request
        opens the newest again."""
        with self._lock:
            if self._current is not None:
                self._current.con.close()
            if self._sandbox is not None:
                self._sandbox[1].close()
            self._current = self._sandbox = None

    def cursor(self, generation: Generation | None = None) -> duckdb.DuckDBPyConnection:
        """A cursor of its own for one request (a DuckDB connection is not shared across
        threads), on `generation` (default: the newest)."""
        return catalog.snapshot_cursor((generation or self.generation()).con, self.data_dir)

    def sandbox(self) -> sql.Sandbox:
        """The read-only SQL sandbox over the newest published catalog (only with sql_limits)."""
        assert self.sql_limits is not None
        stamp = self.generation().stamp
        with self._lock:
            if self._sandbox is None or self._sandbox[0] != stamp:
                self._sandbox = stamp, sql.Sandbox(self.data_dir, self.encoder, self.sql_limits)
            return self._sandbox[1]

    def encoder(self) -> "clip.ClipEncoder":
        """CLIP, loaded at the first query that needs it and kept."""
        from clipgram.models import clip

        with self._model_lock:
            if self._encoder is None:
                self._encoder = clip.from_config(self.models)
            return self._encoder
