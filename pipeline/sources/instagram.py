"""Instagram profiles through instaloader: live, or recorded in instaloader's own JSON.

A recorded profile is a directory of files written by instaloader's
`save_structure_to_file` (what `instaloader --metadata-json` leaves next to
each post): one Profile structure and one Post structure per post, `.json` or
`.json.xz`. They load into real `instaloader.Post` objects, so live and
recorded scrapes run the same extraction code.
"""

from __future__ import annotations

import logging
from datetime import timezone
from pathlib import Path
from typing import Any, Iterator

import instaloader
import requests
from instaloader import InstaloaderContext, Post, Profile

from pipeline import tables
from pipeline.stages import StageResult

log = logging.getLogger("clipgram.scrape")

# Instagram lists up to 3 pinned posts first, out of date order.
MAX_PINNED = 3


class RecordedDataIncomplete(RuntimeError):
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


def load_recorded(directory: Path) -> tuple[Profile | None, list[Post]]:
    """The profile and its posts (newest first) recorded in `directory`."""
    context = offline_context()
    profile, posts = None, []
    files = sorted([*directory.glob("*.json"), *directory.glob("*.json.xz")])
    if not files:
        raise FileNotFoundError(f"no instaloader JSON files in {directory}")
    for path in files:
        structure = instaloader.load_structure_from_file(context, str(path))
        if isinstance(structure, Profile):
            profile = structure
        elif isinstance(structure, Post):
            posts.append(structure)
    posts.sort(key=lambda p: p.date_utc, reverse=True)
    return profile, posts


def live_posts(account: str, session_user: str = "") -> Iterator[Post]:
    """Posts of `account` from Instagram, newest first (pinned ones may come first)."""
    loader = instaloader.Instaloader(quiet=True, download_pictures=False, save_metadata=False)
    if session_user:
        loader.load_session_from_file(session_user)
    profile = Profile.from_username(loader.context, account)
    yield from profile.get_posts()


def post_row(post: Post) -> dict[str, Any]:
    return {
        "shortcode": post.shortcode,
        "post_id": post.mediaid,
        "owner_username": post.owner_username,
        "owner_id": int(post.owner_id),
        "taken_at": post.date_utc.replace(tzinfo=timezone.utc),
        "caption": post.caption,
        "hashtags": post.caption_hashtags,
        "mentions": post.caption_mentions,
        "tagged_users": post.tagged_users,
        "location": post.location.name if post.location else None,
        "likes": post.likes,
        "comments": post.comments,
        "is_video": post.is_video,
        "typename": post.typename,
        "permalink": f"https://www.instagram.com/p/{post.shortcode}/",
        "accessibility_caption": post.accessibility_caption,
        "media_count": post.mediacount,
    }


def media_rows(post: Post) -> list[dict[str, Any]]:
    """One row per image: each carousel item, or the photo / the video's thumbnail."""
    if post.typename == "GraphSidecar":
        items = [(node.display_url, node.is_video) for node in post.get_sidecar_nodes()]
    else:
        items = [(post.url, post.is_video)]
    return [
        {"media_id": f"{post.shortcode}_{i}", "shortcode": post.shortcode, "position": i,
         "url": url, "is_video": is_video, "status": "pending"}
        for i, (url, is_video) in enumerate(items)
    ]


def new_posts(posts: Iterator[Post], known: set[str], limit: int = 0) -> Iterator[Post]:
    """Posts not yet in the tables, newest first, stopping at the first known one.

    A known post among the first MAX_PINNED may be pinned (out of date order),
    so it is skipped rather than taken as the end of what is new.
    """
    fresh = 0
    for position, post in enumerate(posts):
        if post.shortcode in known:
            if position < MAX_PINNED:
                continue
            return
        yield post
        fresh += 1
        if limit and fresh >= limit:
            return


def scrape(data_dir: Path, account: str, recorded: Path | None = None, limit: int = 0,
           session_user: str = "") -> StageResult:
    """Add the profile's new posts and their media (as pending) to the tables."""
    tables.check_partition_value(account)
    con = tables.connect(data_dir)
    known = {r[0] for r in con.execute(
        "SELECT shortcode FROM posts WHERE account = ?", [account]).fetchall()}
    if recorded is not None:
        _, posts = load_recorded(recorded)
        source = iter(posts)
    else:
        source = live_posts(account, session_user)
    post_batch, media_batch = [], []
    for post in new_posts(source, known, limit):
        post_batch.append(post_row(post))
        media_batch.extend(media_rows(post))
    # media first: a post row is the marker that the post was fully scraped
    tables.write_part(data_dir, tables.MEDIA, account, media_batch)
    tables.write_part(data_dir, tables.POSTS, account, post_batch)
    return StageResult("scrape", account, done=len(post_batch),
                       note=f"{len(media_batch)} images queued").log()
