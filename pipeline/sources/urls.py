"""A list of image URLs as an account: one post per URL, downloaded by the download stage.

Accepted shapes: a text file with one URL per line (blank lines and `#`
comments ignored), or JSON: a list of URLs, a list of objects with a `url`
(and optionally `caption`, `taken_at`), `{"urls": [...]}`, or an object
mapping names to URLs (the name becomes the caption).
"""

from __future__ import annotations

import codecs
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from clipgram import tables
from clipgram.errors import ClipgramError
from clipgram.result import StageResult
from clipgram.sources.folder import post_row, shortcode_for
from clipgram.stages import download

log = logging.getLogger("clipgram.scrape")


class BadUrlList(ClipgramError, ValueError):
    pass


def _entry(item: Any, where: str) -> dict[str, Any]:
    if isinstance(item, str):
        return {"url": item.strip()}
    if isinstance(item, dict) and isinstance(item.get("url"), str):
        return item
    raise BadUrlList(f"{where}: expected a URL or an object with a \"url\", got {item!r:.80}")


# byte-order marks: Windows tools write UTF-16 (PowerShell's `echo … >> list.txt`) or UTF-8 with one
_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def _decoded(path: Path) -> str:
    """The file's text: UTF-8, or the encoding its byte-order mark names; undecodable bytes
    replaced (they make that line's URL fail, not the list)."""
    raw = path.read_bytes()
    encoding = next((name for bom, name in _BOMS if raw.startswith(bom)), "utf-8")
    return raw.decode(encoding, errors="replace")


def read_url_list(path: Path) -> list[dict[str, Any]]:
    """The entries of a URL list, each a dict with at least `url`; duplicates dropped."""
    text = _decoded(path)
    if text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadUrlList(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        if isinstance(data, dict):
            data = data["urls"] if isinstance(data.get("urls"), list) else [
                {"url": url, "caption": name} for name, url in data.items()]
        if not isinstance(data, list):
            raise BadUrlList(f"{path}: expected a JSON list or object of URLs")
        entries = [{**_entry(item, f"{path} item {i}"), "where": f"item {i}"}
                   for i, item in enumerate(data)]
    else:
        entries = [{"url": line.strip(), "where": f"line {n}"} for n, line in enumerate(text.splitlines(), 1)
                   if line.strip() and not line.lstrip().startswith("#")]
    unique: dict[str, dict[str, Any]] = {}
    for entry in entries:
        unique.setdefault(entry["url"], entry)
    return list(unique.values())


def _taken_at(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        stamp = datetime.fromisoformat(value)
    except ValueError:
        return None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


def url_problem(url: str) -> str | None:
    """Why `url` is no image URL (None when it may be one): what the download stage would refuse
    it for before any request, or a line that is no single URL."""
    try:
        download.parse_url(url)
    except download.DownloadError as e:
        return str(e)
    if len(url.split()) > 1 and sum(part.startswith(("http://", "https://")) for part in url.split()) > 1:
        return "several URLs on one line"
    if "\ufffd" in url:
        return "bytes that are not text in this line"
    return None


def scan(data_dir: Path, account: str, path: Path) -> StageResult:
    """Queue the list's URLs not queued yet, as posts with one pending image each.

    A line that is no http(s) URL is kept as a failed row saying which line and why
    (nothing in the list is lost), and the scan names them all in one log line."""
    tables.check_partition_value(account)
    entries = read_url_list(path)
    known = {r[0] for r in tables.connect(data_dir).execute(
        "SELECT shortcode FROM posts WHERE account = ?", [account]).fetchall()}
    posts, media, bad = [], [], []
    for entry in entries:
        shortcode = shortcode_for(entry["url"], "u")
        if shortcode in known:
            continue
        caption = entry.get("caption") if isinstance(entry.get("caption"), str) else None
        posts.append(post_row(account, shortcode, _taken_at(entry.get("taken_at")), caption,
                              entry["url"], "UrlImage"))
        problem = url_problem(entry["url"])
        if problem:
            bad.append(f"{entry['where']} ({entry['url'][:60]!r})")
        media.append(tables.media_row(
            shortcode, 0, entry["url"], error=f"{entry['where']} of {path.name}: {problem}" if problem else None))
    tables.write_part(data_dir, tables.MEDIA, account, media)
    tables.write_part(data_dir, tables.POSTS, account, posts)
    if bad:
        log.warning("%s: %d entries are not http(s) URLs, kept as failed rows: %s%s", path.name, len(bad),
                    ", ".join(bad[:10]), f" and {len(bad) - 10} more" if len(bad) > 10 else "")
    return StageResult("scrape", account, done=len(posts), failed=len(bad),
                       note=f"{len(media) - len(bad)} images queued from {path.name}").log()
