"""Instagram profiles through instaloader: live, or recorded in instaloader's own JSON.

A recorded profile is a directory of files written by instaloader's
`save_structure_to_file` (what `instaloader --metadata-json` leaves next to
each post): one Profile structure and one Post structure per post, `.json` or
`.json.xz`. They load into real `instaloader.Post` objects, so live and
recorded scrapes run the same extraction code.
"""

from __future__ import annotations

import functools
import json
import logging
import lzma
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import instaloader
import requests
from instaloader import InstaloaderContext, NodeIterator, Post, Profile

from clipgram import tables
from clipgram.errors import ClipgramError
from clipgram.result import StageResult
from clipgram.sources import instagram_rows as rows
from clipgram.sources import session

log = logging.getLogger("clipgram.scrape")

# Instagram lists up to 3 pinned posts first, out of date order.
MAX_PINNED = 3


class RecordedDataIncomplete(ClipgramError, RuntimeError):
    """instaloader wanted the network while reading a recorded profile."""


class _NoNetwork(requests.adapters.BaseAdapter):
    def send(self, request, **kwargs):  # type: ignore[override]
        raise RecordedDataIncomplete(
            f"recorded profile is missing data: instaloader tried to fetch {request.url}"
        )

    def close(self) -> None:
        pass


def offline_context() -> InstaloaderContext:
    """An instaloader context that fails loudly on any network call."""
    context = InstaloaderContext(sleep=False, quiet=True, max_connection_attempts=1)
    session = requests.Session()
    session.mount("http://", _NoNetwork())
    session.mount("https://", _NoNetwork())
    context._session = session  # instaloader keeps its requests session here
    return context


@dataclass
class Recording:
    """What a directory of instaloader JSON holds: the profile (None for a hashtag or location
    download), its posts as Instagram lists them, and the files that are not post or profile
    structures, with the reason each was left out."""

    profile: Profile | None
    posts: list[Post]
    skipped: dict[str, str] = field(default_factory=dict)


def _read_structure(path: Path) -> Any:
    opener = lzma.open if path.name.endswith(".xz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def _node_type(structure: Any) -> str | None:
    """The node type of a structure that save_structure_to_file wrote, else None."""
    if isinstance(structure, dict) and isinstance(structure.get("node"), dict):
        meta = structure.get("instaloader")
        return meta.get("node_type") if isinstance(meta, dict) else None
    return None


def load_recorded(directory: Path) -> Recording:
    """The profile and posts that `instaloader --metadata-json` recorded in `directory`.

    Structures load as instaloader's own objects, on a context that refuses the
    network. A post saved twice (as `.json` and as `.json.xz`, by two runs) counts
    once; files that are not post or profile structures (`*_comments.json`,
    instaloader 3's shortcode-only files, broken or cut-off files) are left out and
    named.
    """
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a folder of instaloader JSON files")
    files = sorted([*directory.glob("*.json"), *directory.glob("*.json.xz")])
    if not files:
        raise FileNotFoundError(f"no instaloader JSON files (*.json, *.json.xz) in {directory}")
    context = offline_context()
    recording = Recording(None, [])
    seen: set[str] = set()
    for path in files:
        try:
            structure = _read_structure(path)
        except Exception as e:  # a broken or cut-off file is that file's problem
            recording.skipped[path.name] = f"unreadable: {type(e).__name__}: {e}"
            continue
        kind, node = _node_type(structure), structure.get("node") if isinstance(structure, dict) else None
        if kind == "Profile":
            recording.profile = recording.profile or Profile(context, node)
        elif kind == "Post" and isinstance(node.get("shortcode"), str) and isinstance(
                node.get("date", node.get("taken_at_timestamp")), (int, float)):
            if node["shortcode"] not in seen:
                seen.add(node["shortcode"])
                recording.posts.append(Post(context, node))
        else:
            recording.skipped[path.name] = "not an instaloader post or profile structure"
    # as Instagram lists them: pinned posts first, then newest first
    recording.posts.sort(key=lambda p: (not p.is_pinned, -p.date_utc.timestamp()))
    if recording.skipped:
        log.info("%s: %d files left out: %s", directory, len(recording.skipped),
                 "; ".join(f"{k} ({v})" for k, v in list(recording.skipped.items())[:5]))
    return recording


@dataclass(frozen=True)
class ScrapeSettings:
    limit: int = 0                    # at most N new posts this run; 0 = no limit
    since: datetime | None = None     # ignore posts older than this (pinned ones included)
    full: bool = False                # walk the whole profile, not just what is new
    session_user: str = ""            # instaloader session to use ("" = anonymous)
    session_dir: str = ""             # where session files live ("" = instaloader's default)
    max_wait_s: float = 60.0          # a longer rate-limit wait ends the run instead


@dataclass
class Walk:
    """One pass down a profile's post list (pinned posts first, then newest first).

    `stop_at` is the cursor: the walk ends at the first post (outside the pinned
    slots) taken at or before it; older posts in the pinned slots are skipped.
    Without a cursor it goes to the end of the profile. Known posts are
    skipped, never taken as the end: an interrupted walk may have stored newer
    posts above a gap.
    """

    known: set[str]
    stop_at: datetime | None
    since: datetime | None = None
    limit: int = 0
    ended_by: str = "interrupted"       # known | end | since | limit | interrupted
    newest: datetime | None = None      # newest post seen
    seen: set[str] = field(default_factory=set)

    def new_posts(self, posts: Iterable[Post]) -> Iterator[Post]:
        taken = 0
        for position, post in enumerate(posts):
            taken_at = post.date_utc.replace(tzinfo=timezone.utc)
            self.seen.add(post.shortcode)
            self.newest = max(self.newest or taken_at, taken_at)
            maybe_pinned = position < MAX_PINNED or post.is_pinned  # out of date order
            if self.stop_at is not None and taken_at <= self.stop_at:
                if maybe_pinned:  # an old post pinned on top: covered already, never the end
                    continue
                self.ended_by = "known"
                return
            if self.since is not None and taken_at < self.since:
                if maybe_pinned:
                    continue
                self.ended_by = "since"
                return
            if post.shortcode in self.known:
                continue
            yield post
            taken += 1
            if self.limit and taken >= self.limit:
                self.ended_by = "limit"
                return
        self.ended_by = "end"

    def cursor(self, before: datetime | None) -> datetime | None:
        """The cursor after this walk: advanced only when nothing above it was left out."""
        first_run_bounded = before is None and self.ended_by == "limit"
        if self.ended_by in ("known", "end", "since") or first_run_bounded:
            return max(filter(None, [before, self.newest]), default=None)
        return before


# Profile.from_iphone_struct requires these of a timeline item's `user`; real timeline pages
# (2024) carry `full_name` only under the item's `owner`, and instaloader raises KeyError.
_USER_FIELDS = ("pk", "username", "is_private", "full_name", "profile_pic_url")


def _timeline_post(context: InstaloaderContext, item: dict[str, Any]) -> Post:
    """A logged-in timeline item as a Post, as instaloader makes it, with the item's `user`
    completed from its `owner` where a field is missing. Costs no request."""
    owner, user = item.get("owner") or {}, item.get("user") or {}
    completed = {**{key: owner.get(key) for key in _USER_FIELDS}, **user}
    return Post.from_iphone_struct(context, {**item, "user": completed})


def live_posts(profile: Profile) -> Iterator[Post]:
    """The profile's posts, newest first (pinned ones on top), one request per page.

    Logged in, instaloader pages the iPhone timeline (12 items a page) and makes each
    item a Post without a request; the rows read only those items
    (`instagram_rows`). Logged out, instaloader 4.16 fetches each post by its
    shortcode (`Post.from_shortcode`: the logged-out timeline nodes lack captions
    and counts), one request per post on top of the pages.
    """
    posts = profile.get_posts()
    context = profile._context  # noqa: SLF001 - the context the posts are fetched with
    if context.is_logged_in and isinstance(posts, NodeIterator):
        posts._node_wrapper = functools.partial(_timeline_post, context)  # noqa: SLF001
    return iter(posts)


def live_source(account: str, settings: ScrapeSettings) -> tuple[Profile, Iterator[Post]]:
    """The profile and its posts from Instagram, as the profile page lists them."""
    loader = session.loader_for(settings.session_user, settings.session_dir, settings.max_wait_s)
    profile = Profile.from_username(loader.context, account)
    return profile, live_posts(profile)


FLUSH_POSTS = 100  # posts per written part: a long first scrape keeps what it fetched


def scrape(data_dir: Path, account: str, recorded: Path | None = None,
           settings: ScrapeSettings = ScrapeSettings(),
           source: tuple[Profile | None, Iterable[Post]] | None = None) -> StageResult:
    """Add the profile's new posts, their media (pending) and its metadata to the tables.

    Posts come from Instagram, from instaloader JSON files in `recorded`, or
    from `source` (a profile and its post list). Rate limiting ends the run
    cleanly: what was fetched is kept and the next run resumes. Posts that
    vanished from the profile stay in the tables.
    """
    tables.check_partition_value(account)
    result = StageResult("scrape", account)
    if recorded is not None:  # a recording uses no Instagram session: nothing to take turns on
        _scrape(data_dir, account, recorded, settings, source, result)
        return result.log()
    try:
        with session.session_lock(data_dir / "state" / "locks", settings.session_user):
            _scrape(data_dir, account, recorded, settings, source, result)
    except session.SessionBusy as e:
        result.note = str(e)
    return result.log()


def _scrape(data_dir: Path, account: str, recorded: Path | None, settings: ScrapeSettings,
            source: tuple[Profile | None, Iterable[Post]] | None, result: StageResult) -> None:
    con = tables.connect(data_dir)
    known = {r[0] for r in con.execute(
        "SELECT shortcode FROM posts WHERE account = ?", [account]).fetchall()}
    cursor = con.execute("SELECT * EXCLUDE (account, updated_at) FROM profiles WHERE account = ?",
                         [account])
    old = next((dict(zip([d[0] for d in cursor.description], r)) for r in cursor.fetchall()), None)
    before = old["synced_through"] if old else None
    try:
        if source is None and recorded is not None:
            recording = load_recorded(recorded)
            source = (recording.profile, recording.posts)
        elif source is None:
            source = live_source(account, settings)
        profile, posts = source
    except (instaloader.InstaloaderException, instaloader.AbortDownloadException) as e:
        raise session.explain(e, account, settings.session_user) from None

    walk = Walk(known, None if settings.full else before, settings.since, settings.limit)
    post_batch: list[dict[str, Any]] = []
    media_batch: list[dict[str, Any]] = []
    images = 0

    def flush() -> None:
        nonlocal images
        # media first: a post row is the marker that the post was fully scraped
        tables.write_part(data_dir, tables.MEDIA, account, media_batch)
        tables.write_part(data_dir, tables.POSTS, account, post_batch)
        result.done += len(post_batch)
        images += len(media_batch)
        post_batch.clear()
        media_batch.clear()

    error: Exception | None = None
    try:
        for post in walk.new_posts(posts):
            post_batch.append(rows.post_row(post))
            media_batch.extend(rows.media_rows(post))
            if len(post_batch) >= FLUSH_POSTS:
                flush()
    except (instaloader.InstaloaderException, instaloader.AbortDownloadException) as e:
        error = e
    flush()  # whatever happened, keep what was fetched

    row = rows.profile_row(profile, walk.cursor(before) if error is None else before)
    if old is None or any(old.get(k) != v for k, v in row.items()):
        tables.write_part(data_dir, tables.PROFILES, account, [row])
    notes = [f"{images} images queued"]
    if settings.full:
        gone = len(known - walk.seen)
        if gone and error is None:
            notes.append(f"{gone} stored posts are no longer on the profile (kept)")
    if error is not None:
        if not session.is_rate_limit(error):
            raise session.explain(error, account, settings.session_user) from None
        log.warning("scrape %s: rate limited by Instagram (%s); stopping cleanly, "
                    "the next run resumes", account, error)
        notes.append("rate limited: stopped early, the next run resumes")
    result.note = "; ".join(notes)

