"""Download stage: pending media → verified images in the content-addressed store.

Each file streams to a temp file while being hashed, is decoded in full to
prove it is an image, then is renamed to `media/<sha[:2]>/<sha>.<ext>`. The same
picture under two URLs is stored once. A failure is recorded on the media row
with its reason; it never stops the other downloads.

Only http(s) is fetched, and redirects are followed by hand so that every hop
is checked: a URL from a scraped profile may not point into the local network
(loopback, private, link-local) unless `allow_private_network` is set.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import ipaddress
import logging
import os
import random
import re
import socket
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, BinaryIO

import httpx
from tqdm import tqdm

from clipgram import images, storage, tables, verifier
from clipgram.config import DownloadSettings
from clipgram.result import StageResult

log = logging.getLogger("clipgram.download")

FLUSH_EVERY = 256   # media rows per written part: a killed run keeps what it finished
FLUSH_EVERY_S = 10  # …or seconds, whichever comes first


def verifiers(settings: DownloadSettings) -> verifier.Verifier:
    """Worker processes that verify the stage's files (one per core at most)."""
    return verifier.Verifier(verifier.VerifySettings(
        settings.max_image_pixels, settings.decode_deadline_s,
        min(settings.concurrency, verifier.usable_cores())))


class DownloadError(Exception):
    pass


class StoreUnavailable(RuntimeError):
    """The data store refused a file: no single item's fault, so the stage stops."""


MAX_REDIRECTS = 5


@functools.lru_cache(maxsize=1024)
def _addresses(host: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    try:
        return (ipaddress.ip_address(host),)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return ()  # the request itself reports the DNS failure
    return tuple({ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos})


_HOST = re.compile(r"[A-Za-z0-9_.-]+|[0-9A-Fa-f:.]+")  # a name (IDNA as punycode), IPv4 or IPv6


def parse_url(url: str) -> httpx.URL:
    """`url` parsed, when it is an http(s) URL with a possible host; DownloadError saying why not."""
    try:
        parsed = httpx.URL(url)
    except Exception:  # InvalidURL, TypeError, an IDNA codec's UnicodeError, …
        raise DownloadError(f"not a valid URL: {url!r}") from None
    if parsed.scheme not in ("http", "https"):
        raise DownloadError(f"refusing non-http(s) URL {url!r}")
    if not _HOST.fullmatch(parsed.host):  # httpx percent-encodes what no host may hold
        raise DownloadError(f"not a valid host name in {url!r}: {parsed.host!r}")
    return parsed


def check_url(url: str, allow_private_network: bool) -> httpx.URL:
    """The URL if clipgram may fetch it; DownloadError saying why not otherwise."""
    parsed = parse_url(url)
    if not allow_private_network:
        for address in _addresses(parsed.host):
            if not address.is_global:
                raise DownloadError(
                    f"refusing {url}: {parsed.host} is a local or private address ({address}); "
                    "set --allow-private-network (download.allow_private_network) to allow it")
    return parsed


def _get(client: httpx.Client, url: str, out: BinaryIO, settings: DownloadSettings) -> str:
    """Stream `url` (following checked redirects) into `out`; return the sha256.

    The body may not pass `settings.max_bytes` nor take longer than `settings.deadline_s`
    in all, whatever Content-Length says: a hostile server cannot fill the disk or hold a
    download slot by trickling."""
    deadline = time.monotonic() + settings.deadline_s
    for _ in range(MAX_REDIRECTS + 1):
        target = check_url(url, settings.allow_private_network)
        with client.stream("GET", target) as response:
            if response.is_redirect:
                url = str(response.url.join(response.headers.get("location", "")))
                continue
            if response.status_code >= 400:
                raise httpx.HTTPStatusError(
                    f"HTTP {response.status_code}", request=response.request, response=response)
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > settings.max_bytes:
                raise DownloadError(_too_large(settings, f"it says {int(declared):,} bytes"))
            digest = hashlib.sha256()
            out.seek(0)
            out.truncate()
            size = 0
            for chunk in response.iter_bytes():  # as it arrives: a trickle meets the deadline
                size += len(chunk)
                if size > settings.max_bytes:
                    raise DownloadError(_too_large(settings, "its body went past that"))
                if time.monotonic() > deadline:
                    raise DownloadError(
                        f"the transfer took longer than {settings.deadline_s:g} s "
                        f"(download.deadline_s) after {size:,} bytes; left out")
                digest.update(chunk)
                out.write(chunk)
            return digest.hexdigest()
    raise DownloadError(f"more than {MAX_REDIRECTS} redirects from {url} (a redirect loop?)")


def _too_large(settings: DownloadSettings, why: str) -> str:
    return (f"larger than download.max_bytes ({settings.max_bytes:,} bytes): {why}; "
            "raise download.max_bytes to fetch it")


def _fetch(client: httpx.Client, url: str, tmp_dir: Path, settings: DownloadSettings) -> tuple[Path, str]:
    """Stream `url` into a temp file; return it and its sha256. Retries transient failures."""
    for attempt in range(settings.retries + 1):
        fd, name = tempfile.mkstemp(dir=tmp_dir, prefix=".download-", suffix=".tmp")
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                return tmp, _get(client, url, f, settings)
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


def _move_into_store(tmp: Path, sha: str, extension: str, data_dir: Path) -> Path:
    """Rename `tmp` to its content address (or drop it: the same bytes are stored)."""
    rel = Path("media") / sha[:2] / f"{sha}.{extension}"
    final = data_dir / rel
    if final.exists():
        tmp.unlink()  # the same file, already stored
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
    # an object-store data dir: the row says done only once the store has the file
    try:
        storage.upload_new(final)
    except Exception as e:
        raise StoreUnavailable(f"cannot upload {rel} to the data store: {images.reason(e)}") from e
    return rel


def _store(tmp: Path, sha: str, data_dir: Path, check: verifier.Verifier) -> dict[str, Any]:
    """Verify the temp file decodes, then move it into the content-addressed store."""
    try:
        info = check.verify(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    size = tmp.stat().st_size
    rel = _move_into_store(tmp, sha, info.extension, data_dir)
    return {"sha256": sha, "path": str(rel), "width": info.width, "height": info.height,
            "bytes": size}


def import_file(source: Path, data_dir: Path, check: verifier.Verifier) -> dict[str, Any]:
    """Copy a local image into the store (verified, content-addressed): the row's file facts."""
    fd, name = tempfile.mkstemp(dir=data_dir / "media", prefix=".import-", suffix=".tmp")
    tmp = Path(name)
    try:
        digest = hashlib.sha256()
        with open(source, "rb") as src, os.fdopen(fd, "wb") as out:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        return _store(tmp, digest.hexdigest(), data_dir, check)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# errors that are about the machine, not the file: the stage stops instead of failing every row
_MACHINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EMFILE, errno.ENFILE, errno.ENOMEM}


def item_failure(e: Exception) -> str:
    """The reason to record on one item's failed row; re-raises what no single item causes."""
    if isinstance(e, StoreUnavailable) or (isinstance(e, OSError) and e.errno in _MACHINE_ERRNOS):
        raise e
    return str(e) if isinstance(e, (DownloadError, images.BadImage)) else images.reason(e)


def _fetch_video(client: httpx.Client, url: str, data_dir: Path, settings: DownloadSettings) -> dict[str, Any]:
    tmp, sha = _fetch(client, url, data_dir / "media", settings)
    with open(tmp, "rb") as f:
        head = f.read(12)
    if head[4:8] != b"ftyp":  # every MP4/MOV starts with an ftyp box
        tmp.unlink()
        raise DownloadError("video: not an MP4 file")
    return {"video_sha256": sha, "video_path": str(_move_into_store(tmp, sha, "mp4", data_dir))}


def download_one(client: httpx.Client, row: dict[str, Any], data_dir: Path,
                 settings: DownloadSettings, check: verifier.Verifier) -> dict[str, Any]:
    """The media row after an attempt: status done with the file's facts, or failed with why."""
    if row["status"] != "done":
        try:
            tmp, sha = _fetch(client, row["url"], data_dir / "media", settings)
            row = {**row, **_store(tmp, sha, data_dir, check), "status": "done", "error": None}
        except Exception as e:  # whatever one URL or its bytes do, it is that row's failure
            return {**row, "status": "failed", "error": item_failure(e)}
    if settings.videos and row.get("video_url") and not row.get("video_sha256"):
        try:
            row = {**row, **_fetch_video(client, row["video_url"], data_dir, settings), "error": None}
        except Exception as e:  # the thumbnail is still good: keep it, say why the video is not
            why = item_failure(e)
            row = {**row, "error": why if why.startswith("video") else f"video: {why}"}
    return row


def process(data_dir: Path, account: str, stage: str, rows: list[dict[str, Any]],
            work: Callable[[dict[str, Any]], dict[str, Any]], concurrency: int) -> StageResult:
    """Run `work` on every media row in a thread pool, writing the results as they finish."""
    result = StageResult(stage, account)
    if not rows:
        return result.log()
    (data_dir / "media").mkdir(parents=True, exist_ok=True)
    finished: list[dict[str, Any]] = []
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal last_flush
        tables.write_part(data_dir, tables.MEDIA, account, finished)
        finished.clear()
        last_flush = time.monotonic()

    with ThreadPoolExecutor(concurrency, thread_name_prefix=stage) as pool, \
            tqdm(total=len(rows), desc=f"{stage} {account}", unit="img") as bar:
        futures = [pool.submit(work, row) for row in rows]
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
                # by count and by time: a killed run keeps what it finished
                if len(finished) >= FLUSH_EVERY or time.monotonic() - last_flush > FLUSH_EVERY_S:
                    flush()
        finally:
            for future in futures:
                future.cancel()
            flush()
    return result.log()


def _todo(data_dir: Path, account: str, videos: bool) -> list[dict[str, Any]]:
    """Pending rows, rows whose file left the store, and (with videos) videos not fetched yet.

    A URL already downloaded for any account is filled in from that row instead
    of being fetched again.
    """
    @functools.cache
    def in_store() -> set[str]:  # an object-store data dir's files: listed once, if ever needed
        return storage.stored_media(data_dir)

    def stored(rel: str) -> bool:
        return (data_dir / rel).exists() or rel in in_store()

    con = tables.connect(data_dir)
    rows = []
    for row in tables.rows(con, tables.MEDIA, "account = ? AND status IN ('pending', 'done') "
                           "ORDER BY media_id", [account]):
        if row["status"] == "done" and not stored(row["path"]):
            row["status"] = "pending"  # the file is gone: fetch it again
        if row["status"] == "pending" or (videos and row["video_url"] and not row["video_sha256"]):
            rows.append(row)
    known = {url: dict(zip(("sha256", "path", "width", "height", "bytes"), facts))
             for url, *facts in con.execute(
                 "SELECT url, any_value(sha256), any_value(path), any_value(width), "
                 "any_value(height), any_value(bytes) FROM media WHERE status = 'done' GROUP BY url"
             ).fetchall()}
    for row in rows:
        facts = known.get(row["url"])
        if row["status"] == "pending" and facts and stored(facts["path"]):
            row.update(facts, status="done", error=None)
    return rows


def download(data_dir: Path, account: str, settings: DownloadSettings) -> StageResult:
    """Download every pending image of `account` (and its videos, with `settings.videos`)."""
    todo = _todo(data_dir, account, settings.videos)
    if (data_dir / "media").is_dir():
        tables.remove_stale_temp_files(data_dir / "media", ".*.tmp")  # downloads write there
    limits = httpx.Limits(max_connections=settings.concurrency,
                          max_keepalive_connections=settings.concurrency)
    with httpx.Client(timeout=settings.timeout_s, limits=limits, follow_redirects=False) as client, \
            verifiers(settings) as check:
        return process(data_dir, account, "download", todo,
                       lambda row: download_one(client, row, data_dir, settings, check),
                       settings.concurrency)
