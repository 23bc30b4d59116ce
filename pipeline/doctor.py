"""Unreadable files in a library's tables, found (`clipgram doctor`) and moved aside (`clipgram
repair`).

A Parquet part cut short (a machine that crashed, a copy or a sync tool interrupted), a
zero-byte part, a file that is not Parquet at all, or a temp file an interrupted write left:
each is named with what is wrong. Repair moves them, never deletes them, into `quarantine/`
under the data directory (in its object store too, when it has one), keeping their paths;
the stages compute their to-do lists from the tables, so a rerun redoes exactly the rows the
moved parts held.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from clipgram import storage
from clipgram.errors import ClipgramError

QUARANTINE = "quarantine"


class Unreadable(ClipgramError):
    """A file under tables/ that does not read; the message names it and says what to do."""


@dataclass(frozen=True)
class Problem:
    path: Path      # relative to the data directory
    what: str


def _problem(path: Path) -> str | None:
    """What is wrong with one file under tables/, or None when it reads as a Parquet part."""
    if path.name.startswith(".") and ".tmp" in path.name:
        return "left by a write that was interrupted"
    if path.suffix != ".parquet":
        return "not a Parquet part (a stray file)"
    if path.stat().st_size == 0:
        return "empty (zero bytes)"
    try:
        pq.read_table(path)  # every page, not only the footer: a part can be torn in the middle
    except (pa.ArrowException, OSError) as e:
        return f"does not read: {str(e).splitlines()[0]}"
    return None


def check(data_dir: Path) -> list[Problem]:
    """Every file under tables/ that is not a readable Parquet part, in path order."""
    found = []
    for path in sorted((data_dir / "tables").rglob("*")):
        if path.is_file() and (what := _problem(path)) is not None:
            found.append(Problem(path.relative_to(data_dir), what))
    return found


def repair(data_dir: Path, problems: list[Problem]) -> list[Path]:
    """Move each problem file to quarantine/<its path> (a numbered name if one is there
    already); the paths they were moved to."""
    moved = []
    for problem in problems:
        target = data_dir / QUARANTINE / problem.path
        n = 1
        while target.exists():
            target = target.with_name(f"{problem.path.name}.{n}")
            n += 1
        storage.move(data_dir / problem.path, target)  # in an object-store data dir, there too
        moved.append(target)
    return moved


# how DuckDB and Arrow name a file they could not read as Parquet
_UNREADABLE = re.compile(r"(magic bytes|Parquet|parquet|thrift|Invalid Input Error|Corrupt)")
_TABLE_FILE = re.compile(r"(/\S*?tables/[^'\"\s*]+\.parquet)")  # a file, not a glob


def unreadable(error: BaseException) -> Unreadable | None:
    """DuckDB's or Arrow's error about a file under tables/ that does not read, as an Unreadable
    naming that file and what to do; None for any other error."""
    if isinstance(error, Unreadable):
        return error
    text = str(error)
    found = _TABLE_FILE.search(text)
    if found is None or not _UNREADABLE.search(text):
        return None
    return Unreadable(f"{os.path.normpath(found.group(1))} does not read (torn, empty or not Parquet): `clipgram doctor` lists "
                      f"every such file, `clipgram repair` moves them into {QUARANTINE}/, and a rerun redoes "
                      "their rows")


@contextmanager
def naming_unreadable() -> Iterator[None]:
    """Within it, an error about a table file that does not read is raised as Unreadable (the
    original as its cause): what a stage, a flow or a page says is which file, and what to do."""
    try:
        yield
    except (duckdb.Error, pa.ArrowException, OSError) as e:
        found = unreadable(e)
        if found is None or found is e:
            raise
        raise found from e
