"""Where the data directory lives: a local path, or an object store mirrored on each machine.

With `data.dir = "s3://bucket/clipgram"` (any fsspec URL: s3://, gs://, az://,
file://) the store holds the data — `tables/`, `media/` and the user's label
sets — and every machine works in a local mirror of it (`data.cache_dir`).
Stages read and write plain local files, as they do for a local data dir; this
module keeps the mirror and the store in step:

- a file is uploaded before it is renamed into place locally, so anything a
  machine sees in its mirror is already in the store, and a run killed between
  the two leaves at most an object the next run overwrites with the same bytes;
- `pull` makes the mirror's tables what the store holds (new parts in, parts
  another machine compacted away out), at the start of every stage and command;
- media are content-addressed and immutable, so they are fetched lazily, when a
  stage or a page needs the pixels;
- a store that answers errors (500, 503 SlowDown) or drops connections is retried
  with exponential backoff for `data.retry_s` seconds before the command stops with
  one line naming it: every write is one whole object, so nothing half-written is
  ever visible, and a rerun converges.

The catalog (catalog.duckdb, the vector index) and the locks stay local: they
are derived from the tables, or about one machine's processes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipgram.errors import ClipgramError

log = logging.getLogger("clipgram.storage")

# Files outside tables/ and media/ that belong to the data, not to one machine.
SHARED_FILES = ("labels.toml", "catalog.json")
_TRANSFERS = 16  # concurrent object transfers: latency-bound, not CPU-bound


class StorageError(ClipgramError, RuntimeError):
    """The object store could not be reached or read; the message says what to check."""


@dataclass(frozen=True)
class Remote:
    url: str                # the data dir's URL, as configured
    fs: Any                 # fsspec.AbstractFileSystem
    root: str               # the URL's path inside `fs`, no trailing slash
    local: Path             # this machine's mirror of it
    retry_s: float = 60.0   # how long a failing call is retried before the command stops

    def key(self, rel: str) -> str:
        return f"{self.root}/{rel}"


_MIRRORS: dict[Path, Remote] = {}


def is_url(location: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", location) is not None


def default_cache(url: str) -> Path:
    """~/.cache/clipgram/data/<readable name>-<hash>: one mirror per store URL."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[1]).strip("_")[-60:]
    digest = hashlib.sha256(url.encode()).hexdigest()[:10]
    return Path.home() / ".cache" / "clipgram" / "data" / f"{name}-{digest}"


def local_dir(location: str, cache_dir: str = "", options: dict[str, Any] | None = None,
              retry_s: float = 60.0) -> Path:
    """The directory stages work in for data dir `location`.

    A local path is itself. A URL gets a local mirror (`cache_dir`, or one under
    ~/.cache/clipgram/data), registered so that writes under it reach the store.
    """
    if not is_url(location):
        return Path(location).expanduser().resolve()
    local = Path(cache_dir).expanduser().resolve() if cache_dir else default_cache(location)
    if local in _MIRRORS and _MIRRORS[local].url != location:
        raise StorageError(f"{local} already mirrors {_MIRRORS[local].url}: "
                           f"give {location} its own [data] cache_dir")
    if local not in _MIRRORS:
        import fsspec  # only object-store users pay for the import

        try:
            fs, root = fsspec.core.url_to_fs(location, **(options or {}))
        except (ImportError, ValueError) as e:
            raise StorageError(f"cannot open data dir {location}: {e} (for s3:// install s3fs, "
                               "for gs:// gcsfs; settings go in [data] storage_options)") from None
        _MIRRORS[local] = Remote(location, fs, root.rstrip("/"), local, retry_s)
        local.mkdir(parents=True, exist_ok=True)
    return local


def _remote(path: Path) -> tuple[Remote, str] | None:
    """The store behind local `path`, and the path's key relative to the data dir."""
    for remote in _MIRRORS.values():
        if path.is_relative_to(remote.local):
            return remote, path.relative_to(remote.local).as_posix()
    return None


def remote_url(data_dir: Path) -> str | None:
    """The store URL `data_dir` mirrors, None for a plain local data dir."""
    found = _remote(data_dir)
    return found[0].url if found else None


FIRST_RETRY_S, LONGEST_RETRY_S = 0.2, 10.0


def is_lasting(error: BaseException) -> bool:
    """Whether the store will answer the same again: a missing object, denied access, missing
    credentials, a bad setting. Anything else (5xx, throttling, a dropped or refused
    connection, a timeout) may pass, and is retried."""
    return isinstance(error, (FileNotFoundError, PermissionError, ValueError, TypeError, ImportError)) or \
        "Credentials" in type(error).__name__


def _call(what: str, remote: Remote, fn: Any, *args: Any) -> Any:
    """`fn(*args)` against the store, retried with exponential backoff (and jitter, so that
    concurrent transfers do not come back at once) for `remote.retry_s` seconds while the
    error may pass; then a StorageError naming the store."""
    started, attempt = time.monotonic(), 0
    while True:
        try:
            return fn(*args)
        except FileNotFoundError:
            raise
        except Exception as e:  # each backend has its own errors (botocore's, google-auth's, …)
            delay = min(LONGEST_RETRY_S, FIRST_RETRY_S * 2 ** attempt) * random.uniform(0.5, 1.0)
            waited = time.monotonic() - started
            if is_lasting(e) or waited + delay > remote.retry_s:
                tried = f" (tried for {waited:.0f} s)" if attempt else ""
                raise StorageError(f"{what} {remote.url}: {type(e).__name__}: {e}{tried}; check the URL, "
                                   "credentials and [data] storage_options, then run the same command "
                                   "again") from e
            (log.warning if attempt == 0 else log.debug)(
                "%s %s: %s: %s; retrying for up to %.0f s", what, remote.url, type(e).__name__, e, remote.retry_s)
            attempt += 1
            time.sleep(delay)


def upload(tmp: Path, final: Path) -> None:
    """Put local file `tmp` in the store as `final` (a local path under a mirror), if it is one."""
    found = _remote(final)
    if found:
        remote, rel = found
        _call("cannot write to", remote, remote.fs.put_file, str(tmp), remote.key(rel))


def temp_path(final: Path) -> Path:
    """Where to write `final` before renaming it into place: hidden and not `final`'s suffix,
    so no reader's glob sees it half-written (tables.remove_stale_temp_files finds leftovers)."""
    return final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"


@contextmanager
def replacing(final: Path, to_store: bool = True) -> Iterator[Path]:
    """A temp path beside `final` to write its new content to. When the block ends well, the
    file replaces `final` whole (in the store first, when there is one and `to_store`); when
    it fails (a full disk), the temp file goes: a reader sees the old file or the new one."""
    tmp = temp_path(final)
    try:
        yield tmp
        if to_store:
            upload(tmp, final)
        os.replace(tmp, final)
    except OSError as e:
        if e.filename is None:  # a write() says nothing of where: a full disk's message names it
            e.filename = str(final)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """Replace the small file `path` with `text` atomically, in the store first when there is one."""
    with replacing(path) as tmp:
        tmp.write_text(text)


def upload_new(path: Path) -> None:
    """Upload content-addressed `path` unless the store already has it (same name, same bytes)."""
    found = _remote(path)
    if found:
        remote, rel = found
        if not _call("cannot read", remote, remote.fs.exists, remote.key(rel)):
            _call("cannot write to", remote, remote.fs.put_file, str(path), remote.key(rel))


def move(source: Path, target: Path) -> None:
    """Move a file of a data dir to another path of it: in the store first, when there is one
    (a copy there, then the original's removal, so the next pull does not bring it back)."""
    found, to = _remote(source), _remote(target)
    if found and to:
        remote, rel = found
        try:
            _call("cannot write to", remote, remote.fs.copy, remote.key(rel), remote.key(to[1]))
        except FileNotFoundError:
            pass  # only in this mirror: a temp file of a write killed before its upload
        else:
            _call("cannot delete from", remote, remote.fs.rm_file, remote.key(rel))
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(source, target)


def remove(paths: Iterable[Path]) -> None:
    """Delete files from the store, then locally: a run killed between leaves the next pull to finish."""
    paths = list(paths)
    for path in paths:
        found = _remote(path)
        if found:
            remote, rel = found
            _call("cannot delete from", remote, remote.fs.rm_file, remote.key(rel))
    for path in paths:
        path.unlink(missing_ok=True)


def _download(remote: Remote, rel: str, final: Path) -> bool:
    """One object to `final`, through a hidden temp file: a reader never sees part of it.

    False when the store has no such object.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    try:
        _call("cannot read", remote, remote.fs.get_file, remote.key(rel), str(tmp))
        os.replace(tmp, final)
        return True
    except FileNotFoundError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _listing(remote: Remote, prefix: str) -> set[str]:
    remote.fs.invalidate_cache()  # another machine may have written since the last listing
    keys = _call("cannot list", remote, remote.fs.find, remote.key(prefix))
    start = len(remote.root) + 1
    return {k[start:] for k in keys}


def _is_part(rel: str) -> bool:
    return rel.endswith(".parquet") and not Path(rel).name.startswith(".")


def pull(data_dir: Path) -> None:
    """Make the mirror's tables (and shared files) what the store holds. No-op for a local dir."""
    found = _remote(data_dir)
    if not found:
        return
    remote = found[0]
    # list the mirror before the store: a part renamed into the mirror was uploaded first,
    # so it is in the store's listing too, unless another machine has since removed it
    local = {rel for rel in (p.relative_to(data_dir).as_posix()
                             for p in (data_dir / "tables").rglob("*.parquet")) if _is_part(rel)}
    stored = {k for k in _listing(remote, "tables") if _is_part(k)}
    # parts (part-*) never change once written; derived tables (labels, clusters, …) are
    # replaced under one name, and are small: those are fetched every time
    missing = sorted(k for k in stored if k not in local or not Path(k).name.startswith("part-"))
    _transfer(remote, data_dir, missing)
    for gone in local - stored:
        (data_dir / gone).unlink(missing_ok=True)
    for name in SHARED_FILES:
        _download(remote, name, data_dir / name)  # a no-op when the store has none yet
    if missing or local - stored:
        log.info("mirror of %s: %d table part(s) fetched, %d removed",
                 remote.url, len(missing), len(local - stored))


def _transfer(remote: Remote, data_dir: Path, rels: list[str]) -> int:
    """Download `rels` into `data_dir`, concurrently; how many the store had."""
    with ThreadPoolExecutor(_TRANSFERS) as pool:
        return sum(pool.map(lambda rel: _download(remote, rel, data_dir / rel), rels))


def ensure_local(paths: Iterable[Path]) -> None:
    """Fetch the files among `paths` that a mirror lacks locally from its store.

    Files in no mirror, or missing from the store too, are left for the caller
    to find missing (and say so).
    """
    if not _MIRRORS:
        return  # a local data dir: no file to stat here
    wanted: dict[Remote, list[str]] = {}
    for path in paths:
        found = _remote(path)
        if found and not path.exists():
            wanted.setdefault(found[0], []).append(found[1])
    for remote, rels in wanted.items():
        fetched = _transfer(remote, remote.local, rels)
        log.info("fetched %d of %d file(s) from %s", fetched, len(rels), remote.url)


def stored_media(data_dir: Path) -> set[str]:
    """Relative paths of the media the store holds (empty for a local data dir)."""
    found = _remote(data_dir)
    return _listing(found[0], "media") if found else set()
