"""Scrape stage: new posts and their media rows (pending, or imported) from any source.

Instagram (live or recorded, `sources.instagram`), a folder (`sources.folder`) or a URL
list (`sources.urls`): every source writes the same `posts` and `media` rows.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from clipgram.config import Config, ConfigError
from clipgram.result import StageResult
from clipgram.sources import folder, instagram, urls


def parse_since(value: str) -> datetime | None:
    """`scrape.since` ("" or an ISO date/time, UTC unless it says otherwise) as a datetime."""
    if not value:
        return None
    try:
        stamp = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"scrape.since: expected a date like 2024-01-31, got {value!r}") from None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


def scrape_settings(cfg: Config) -> instagram.ScrapeSettings:
    s = cfg.scrape
    return instagram.ScrapeSettings(limit=s.limit, since=parse_since(s.since), full=s.full,
                                    session_user=s.session_user, session_dir=s.session_dir,
                                    max_wait_s=s.max_wait_s)


def account_for(source: Path, name: str | None) -> str:
    """The account a folder or URL list lands in: `name`, else the folder's name or the file's stem."""
    return name or (source.resolve().name if source.is_dir() else source.stem)


def collect(cfg: Config, account: str, recorded: Path | None = None,
            source: Path | None = None) -> StageResult:
    """The first stage for any source: new posts and their (pending or imported) media rows."""
    if source is None:
        return instagram.scrape(cfg.data_dir, account, recorded, scrape_settings(cfg))
    if source.is_dir():
        return folder.scan(cfg.data_dir, account, source, cfg.download)
    if source.is_file():
        return urls.scan(cfg.data_dir, account, source)
    raise FileNotFoundError(f"{source} is neither a folder nor a URL list file")
