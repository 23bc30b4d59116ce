"""Table rows from instaloader's Post and Profile objects, read from their nodes alone.

Most of instaloader's properties fall back to the network when their node lacks a
field: `Post.comments`, `tagged_users`, `location` and carousel items with a video
fetch the post's full metadata (`Post._full_metadata`, one request per post);
`Post.url` and `get_sidecar_nodes()` fetch the iPhone struct when logged in;
`Post.video_url` sends a HEAD per video version; every `Profile` property but a
few re-fetches the profile. On a live scrape that doubles the requests per post,
and on a recorded profile it is a request that cannot succeed. So rows are built
here from the node dicts instaloader was given, never through those properties:
what a node lacks is NULL. Only properties that read the node and nothing else
are used (`shortcode`, `date_utc`, `caption` and its hashtags and mentions, so
captions are normalised as instaloader normalises them).

instaloader has written two node shapes over the years, and both are read:
- GraphQL (up to 4.10): `taken_at_timestamp`, `edge_media_to_caption`,
  `edge_media_to_comment`, full carousel children in `edge_sidecar_to_children`;
- iPhone API (4.11 on): `date`, `caption` (a string or null), `comments` (a
  number) and the raw API item in `iphone_struct`; carousel children hold only
  `display_url` and `is_video`, the rest is in `iphone_struct.carousel_media`.
Logged-in 4.14 nodes carry both.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from instaloader import Post, Profile

from clipgram import tables


def _dig(node: Any, *keys: str | int) -> Any:
    """node[k0][k1]…, or None where a key is missing or a value is not a container."""
    for key in keys:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _node(post: Post | Profile) -> dict[str, Any]:
    return post._node  # noqa: SLF001 - the node is what instaloader was given; reading it costs nothing


def _tagged(node: dict[str, Any]) -> list[str] | None:
    edges = _dig(node, "edge_media_to_tagged_user", "edges")
    if isinstance(edges, list):
        names = [_dig(e, "node", "user", "username") for e in edges]
    else:
        tags = _dig(node, "iphone_struct", "usertags", "in")
        if not isinstance(tags, list):
            return None
        names = [_dig(t, "user", "username") for t in tags]
    return [n.lower() for n in names if isinstance(n, str)]


def post_row(post: Post) -> dict[str, Any]:
    """The posts row of `post`, from its node only: a field the node lacks is None."""
    node = _node(post)
    phone = node.get("iphone_struct") or {}
    owner = node.get("owner") or {}
    username = _first(owner.get("username"), _dig(phone, "user", "username"))
    return tables.post_row(
        shortcode=post.shortcode,
        post_id=_int(_first(node.get("id"), phone.get("pk"))),
        owner_username=username.lower() if isinstance(username, str) else None,
        owner_id=_int(_first(owner.get("id"), _dig(phone, "user", "pk"))),
        taken_at=post.date_utc.replace(tzinfo=timezone.utc),
        caption=post.caption,
        hashtags=post.caption_hashtags,
        mentions=post.caption_mentions,
        tagged_users=_tagged(node),
        location=_first(_dig(node, "location", "name"), _dig(phone, "location", "name")),
        likes=_int(_first(_dig(node, "edge_media_preview_like", "count"),
                          _dig(node, "edge_liked_by", "count"), phone.get("like_count"))),
        comments=_int(_first(_dig(node, "edge_media_to_comment", "count"),
                             _dig(node, "edge_media_to_parent_comment", "count"),
                             node.get("comments") if not isinstance(node.get("comments"), dict)
                             else None, phone.get("comment_count"))),
        is_video=bool(node.get("is_video")),
        typename=node.get("__typename"),
        permalink=f"https://www.instagram.com/p/{post.shortcode}/",
        accessibility_caption=node.get("accessibility_caption"),
        media_count=len(_children(node)) or 1,
    )


def _children(node: dict[str, Any]) -> list[dict[str, Any]]:
    edges = _dig(node, "edge_sidecar_to_children", "edges")
    return [e.get("node") or {} for e in edges if isinstance(e, dict)] if isinstance(edges, list) else []


def _video_url(item: dict[str, Any], phone: Any) -> str | None:
    return _first(item.get("video_url"), _dig(phone, "video_versions", 0, "url"))


def media_rows(post: Post) -> list[dict[str, Any]]:
    """One pending media row per image: each carousel item in order, or the photo / the video's
    thumbnail. A video item's video URL comes from its node or the iPhone struct, when there."""
    node = _node(post)
    phone_items = _dig(node, "iphone_struct", "carousel_media")
    children = _children(node)
    if children:
        items = [(child.get("display_url"), bool(child.get("is_video")),
                  _video_url(child, _dig(phone_items, i)) if child.get("is_video") else None)
                 for i, child in enumerate(children)]
    else:
        is_video = bool(node.get("is_video"))
        items = [(_first(node.get("display_url"), node.get("display_src")), is_video,
                  _video_url(node, node.get("iphone_struct")) if is_video else None)]
    return [tables.media_row(post.shortcode, i, url, is_video=is_video, video_url=video_url,
                             error=None if url else "the post has no image URL for this item")
            for i, (url, is_video, video_url) in enumerate(items)]


def profile_row(profile: Profile | None, synced_through: datetime | None) -> dict[str, Any]:
    """The profiles row: the cursor, and what the profile's node holds (None for the rest)."""
    row: dict[str, Any] = {"synced_through": synced_through}
    if profile is not None:
        node = _node(profile)
        username = node.get("username")
        row.update(
            profile_id=_int(_first(node.get("id"), node.get("pk"))),
            username=username.lower() if isinstance(username, str) else None,
            full_name=node.get("full_name"), biography=node.get("biography"),
            followers=_int(_first(_dig(node, "edge_followed_by", "count"), node.get("follower_count"))),
            followees=_int(_first(_dig(node, "edge_follow", "count"), node.get("following_count"))),
            post_count=_int(_first(_dig(node, "edge_owner_to_timeline_media", "count"),
                                   node.get("media_count"))),
            is_private=node.get("is_private"),
            profile_pic_url=_first(node.get("profile_pic_url_hd"), node.get("profile_pic_url")))
    return row
