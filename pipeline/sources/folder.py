"""A folder of images as an account: every image file under it (recursive) is a post.

Files are copied into the content-addressed store, verified like downloads, so
the rows that come out are the same as a scraped profile's and flow through
embed, caption and search unchanged. A post's id comes from the file's path
relative to the folder: a rerun adds only files not seen before.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

from clipgram import tables
from clipgram.config import DownloadSettings
from clipgram.result import StageResult
from clipgram.stages import download

log = logging.getLogger("clipgram.scrape")


def image_files(folder: Path) -> tuple[list[Path], int]:
    """Files under `folder` with an extension Pillow reads (hidden ones left out), and how many others."""
    Image.init()
    readable = set(Image.registered_extensions())
    files, skipped = [], 0
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(p.startswith(".") for p in path.relative_to(folder).parts):
            continue
        if path.suffix.lower() in readable:
            files.append(path)
        else:
            skipped += 1
    return files, skipped


def shortcode_for(key: str, prefix: str) -> str:
    """A stable post id for a file path or URL."""
    return prefix + hashlib.sha256(key.encode()).hexdigest()[:16]


def post_row(account: str, shortcode: str, taken_at: datetime | None, caption: str | None,
             permalink: str, typename: str) -> dict[str, Any]:
    """A posts row for an image that did not come from Instagram."""
    return tables.post_row(shortcode=shortcode, owner_username=account, taken_at=taken_at,
                           caption=caption, hashtags=[], mentions=[], tagged_users=[],
                           is_video=False, typename=typename, permalink=permalink, media_count=1)


def scan(data_dir: Path, account: str, folder: Path, settings: DownloadSettings) -> StageResult:
    """Import the images under `folder` not imported yet; posts and media rows like a scrape's."""
    tables.check_partition_value(account)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    files, skipped = image_files(folder)
    if skipped:
        log.info("%s: %d files without an image extension left out", folder, skipped)
    known = {r[0] for r in tables.connect(data_dir).execute(
        "SELECT shortcode FROM posts WHERE account = ?", [account]).fetchall()}
    todo = []
    for path in files:
        rel = path.relative_to(folder).as_posix()
        shortcode = shortcode_for(rel, "f")
        if shortcode in known:
            continue
        taken_at = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
        todo.append((path, post_row(account, shortcode, taken_at, rel, path.resolve().as_uri(), "LocalFile")))
    sources = {f"{post['shortcode']}_0": path for path, post in todo}
    media = [tables.media_row(post["shortcode"], 0, post["permalink"]) for _, post in todo]
    (data_dir / "media").mkdir(parents=True, exist_ok=True)

    def work(row: dict[str, Any]) -> dict[str, Any]:
        try:
            facts = download.import_file(sources[row["media_id"]], data_dir, check)
            return {**row, **facts, "status": "done", "error": None}
        except Exception as e:  # whatever one file does, it is that file's failed row
            return {**row, "status": "failed", "error": download.item_failure(e)}

    with download.verifiers(settings) as check:
        result = download.process(data_dir, account, "import", media, work, settings.concurrency)
    # posts after their media, as in a scrape: a post row marks a finished import
    tables.write_part(data_dir, tables.POSTS, account, [post for _, post in todo])
    return StageResult("scrape", account, done=len(todo), failed=result.failed,
                       note=f"{result.done} images imported from {folder}").log()
