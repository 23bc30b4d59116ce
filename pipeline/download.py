"""Download stage: pending media → verified images in the content-addressed store.

Each file streams to a temp file while being hashed, is decoded in full to
prove it is an image, then is renamed to `media/<sha[:2]>/<sha>.<ext>`. The same
picture under two URLs is stored once. A failure is recorded on the media row
with its reason; it never stops the other downloads.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from pipeline import images, tables
from pipeline.stages import StageResult

log = logging.getLogger("clipgram.download")

FLUSH_EVERY = 256  # media rows per written part: a killed run keeps what it finished


@dataclass(frozen=True)
class DownloadSettings:
    concurrency: int = 8
    timeout_s: float = 30.0
    retries: int = 3
    max_image_pixels: int = 89_478_485


class DownloadError(Exception):
    pass


def _fetch(client: httpx.Client, url: str, tmp_dir: Path, settings: DownloadSettings) -> tuple[Path, str]:
    """Stream `url` into a temp file; return it and its sha256. Retries transient failures."""
    if not url.startswith(("http://", "https://")):
        raise DownloadError(f"refusing non-http(s) URL {url!r}")
    for attempt in range(settings.retries + 1):
        fd, name = tempfile.mkstemp(dir=tmp_dir, prefix=".download-", suffix=".tmp")
        tmp = Path(name)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as f, client.stream("GET", url) as response:
                if response.status_code >= 400:
                    raise httpx.HTTPStatusError(
                        f"HTTP {response.status_code}", request=response.request, response=response)
                for chunk in response.iter_bytes(1 << 16):
                    digest.update(chunk)
                    f.write(chunk)
            return tmp, digest.hexdigest()
        except (httpx.TransportError, httpx.HTTPStatusError) as e:
            tmp.unlink(missing_ok=True)
            status = e.response.status_code if isinstance(e, httpx.HTTPStatusError) else None
            transient = status is None or status >= 500 or status == 429
            if not transient or attempt == settings.retries:
                raise DownloadError(str(e) if status else f"{type(e).__name__}: {e}") from None
            time.sleep(min(8.0, 0.25 * 2**attempt) * random.uniform(0.5, 1.5))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    raise AssertionError("unreachable")


def _store(tmp: Path, sha: str, data_dir: Path, max_pixels: int) -> dict[str, Any]:
    """Verify the temp file decodes, then move it into the content-addressed store."""
    try:
        info = images.verify(tmp, max_pixels)
    except images.BadImage:
        tmp.unlink(missing_ok=True)
        raise
    rel = Path("media") / sha[:2] / f"{sha}.{info.extension}"
    final = data_dir / rel
    size = tmp.stat().st_size
    if final.exists():
        tmp.unlink()  # the same picture, already stored
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
    return {"sha256": sha, "path": str(rel), "width": info.width, "height": info.height,
            "bytes": size}


def download_one(client: httpx.Client, row: dict[str, Any], data_dir: Path,
                 settings: DownloadSettings) -> dict[str, Any]:
    """The media row after an attempt: status done with the file's facts, or failed with why."""
    tmp_dir = data_dir / "media"
    try:
        tmp, sha = _fetch(client, row["url"], tmp_dir, settings)
        return {**row, **_store(tmp, sha, data_dir, settings.max_image_pixels),
                "status": "done", "error": None}
    except (DownloadError, images.BadImage) as e:
        return {**row, "status": "failed", "error": str(e)}


def download(data_dir: Path, account: str, settings: DownloadSettings = DownloadSettings()) -> StageResult:
    """Download every pending image of `account`."""
    con = tables.connect(data_dir)
    columns = [f.name for f in tables.MEDIA.schema if f.name != "updated_at"]
    todo = [dict(zip(columns, r)) for r in con.execute(
        f"SELECT {', '.join(columns)} FROM media WHERE account = ? AND status = 'pending' "
        "ORDER BY media_id", [account]).fetchall()]
    result = StageResult("download", account)
    if not todo:
        return result.log()
    (data_dir / "media").mkdir(parents=True, exist_ok=True)
    finished: list[dict[str, Any]] = []

    def flush() -> None:
        tables.write_part(data_dir, tables.MEDIA, account, finished)
        finished.clear()

    limits = httpx.Limits(max_connections=settings.concurrency)
    with httpx.Client(timeout=settings.timeout_s, limits=limits, follow_redirects=True) as client, \
            ThreadPoolExecutor(settings.concurrency, thread_name_prefix="download") as pool, \
            tqdm(total=len(todo), desc=f"download {account}", unit="img") as bar:
        futures = [pool.submit(download_one, client, row, data_dir, settings) for row in todo]
        try:
            for future in as_completed(futures):
                row = future.result()
                finished.append(row)
                if row["status"] == "done":
                    result.done += 1
                else:
                    result.failed += 1
                    log.warning("%s: %s (%s)", row["media_id"], row["error"], row["url"])
                bar.update()
                if len(finished) >= FLUSH_EVERY:
                    flush()
        finally:
            for future in futures:
                future.cancel()
            flush()
    return result.log()
