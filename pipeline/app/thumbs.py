"""Thumbnails by content address: made once from the stored image, cached beside the data.

A request names an image only by its sha256; the file it is read from is the path the
catalog holds for that hash. Nothing from a request is ever joined into a path.
"""

from __future__ import annotations

import functools
import io
import logging
import re
from pathlib import Path

import duckdb

from clipgram import images, storage
from clipgram.errors import disk_full

log = logging.getLogger("clipgram.app")

SIDE = 320  # the longer side: sharp in a grid of a few hundred pixels per cell
SHA256 = re.compile(r"[0-9a-f]{64}")
FOLDER = "thumbs"


class NoSuchImage(LookupError):
    pass


def stored(data_dir: Path, con: duckdb.DuckDBPyConnection, sha256: str) -> Path:
    """The stored image `sha256`: the path the catalog holds for it."""
    if not SHA256.fullmatch(sha256):
        raise NoSuchImage("an image is named by the 64 hex digits of its sha256")
    row = con.execute("SELECT path FROM media WHERE sha256 = ? AND status = 'done' LIMIT 1",
                      [sha256]).fetchone()
    if row is None:
        raise NoSuchImage(f"no stored image with sha256 {sha256}")
    return data_dir / row[0]


def thumbnail(data_dir: Path, con: duckdb.DuckDBPyConnection, sha256: str) -> Path | bytes:
    """The cached JPEG thumbnail of the stored image `sha256`, made at the first request; on a
    disk too full to cache it, its bytes: the app goes on showing pictures."""
    if not SHA256.fullmatch(sha256):
        raise NoSuchImage("an image is named by the 64 hex digits of its sha256")
    cached = data_dir / FOLDER / sha256[:2] / f"{sha256}.jpg"
    if cached.is_file() and not cached.is_symlink():  # a link planted there is replaced, not followed
        return cached
    img = images.load_rgb(stored(data_dir, con, sha256), min_side=SIDE)  # the decoder ingestion uses
    img.thumbnail((SIDE, SIDE))
    made = io.BytesIO()
    img.save(made, "JPEG", quality=85)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        # two requests racing both write whole files; either wins
        with storage.replacing(cached, to_store=False) as tmp:  # a cache of this machine's
            tmp.write_bytes(made.getvalue())
        return cached
    except OSError as e:
        if not disk_full(e):
            raise
        _say_disk_full(cached.parent.parent)
        return made.getvalue()


@functools.cache  # once per server: every thumbnail not yet cached meets it
def _say_disk_full(folder: Path) -> None:
    log.warning("the disk holding %s is full: thumbnails are served without being cached; free some "
                "space and they are cached again", folder)
