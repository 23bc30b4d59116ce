"""One ingest per account at a time, one writer per model partition: advisory file locks.

The lock is an flock on `locks/<account>.lock` in the data directory. The
kernel releases it when its holder exits for any reason, SIGKILL included, so
a crashed run never leaves an account locked. (flock is reliable on local
disks; on NFS use one scheduler per data directory, e.g. a Prefect
concurrency limit of 1 per account deployment.)
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ContextManager

from clipgram import tables
from clipgram.errors import ClipgramError

log = logging.getLogger("clipgram.lock")


class AccountBusy(ClipgramError, RuntimeError):
    """Another process is ingesting the account."""


def lock_path(data_dir: Path, account: str) -> Path:
    return data_dir / "locks" / f"{tables.check_partition_value(account)}.lock"


@contextmanager
def hold(path: Path, wait_s: float | None, busy: Callable[[str], Exception]) -> Iterator[None]:
    """flock `path` for the block.

    `wait_s` None waits as long as the holder takes; otherwise try for `wait_s`
    seconds, then raise `busy(holder)`, where holder says who has it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if wait_s is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + wait_s
            waited = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
                    if time.monotonic() >= deadline:
                        raise busy(holder) from None
                    if not waited:
                        log.info("%s is held (%s): waiting up to %.0f s", path.name, holder, wait_s)
                        waited = True
                    time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        # who holds it, for the message the next contender prints
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{tables.now():%Y-%m-%d %H:%M:%S} UTC\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def account_lock(data_dir: Path, account: str, wait_s: float = 0.0) -> ContextManager[None]:
    """Hold the account's lock for the block; wait up to `wait_s` for it, then raise AccountBusy."""
    return hold(lock_path(data_dir, account), wait_s, lambda holder: AccountBusy(
        f"account {account} is already being ingested ({holder}); this run changes "
        f"nothing. Wait for that run to finish, or set [orchestration] lock_wait_s "
        f"to queue behind it."))


def partition_lock(data_dir: Path, table: str, value: str) -> ContextManager[None]:
    """Hold partition `value` of `table` for the block, waiting as long as its holder takes.

    For a stage that computes its to-do list from a table other accounts write too
    (embeddings, captions): taken around the to-do list and the writes, it makes the
    second writer see what the first wrote instead of writing the same rows again.
    """
    path = data_dir / "locks" / f"{table}={tables.check_partition_value(value)}.lock"
    return hold(path, None, RuntimeError)  # never busy: it waits


def catalog_lock(data_dir: Path) -> ContextManager[None]:
    """Hold the catalog for a publish, waiting as long as its holder takes: two accounts'
    runs that publish at once build their catalogs one after the other, not into one file."""
    return hold(data_dir / "locks" / "catalog.lock", None, RuntimeError)  # never busy: it waits
