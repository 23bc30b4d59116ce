"""The embedded default: a sample profile recorded in instaloader's JSON, served locally.

`pipeline/demo_profile/` holds what `instaloader --metadata-json` would have
saved for a small account whose pictures are synthetic scenes: a Profile
structure, one Post structure per post (single images, a carousel, a video)
and the images. Its URLs point at RECORDED_BASE; the demo serves the images on
127.0.0.1 and rewrites that prefix in a copy, so the real download path runs.

Rebuild the sample with `python -m clipgram.demo` (deterministic).
"""

from __future__ import annotations

import random
import shutil
import threading
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import instaloader
from PIL import Image

from clipgram import synthetic
from clipgram.sources.instagram import offline_context

SAMPLE_DIR = Path(__file__).resolve().parent / "demo_profile"
ACCOUNT = "clipgram.demo"
RECORDED_BASE = "http://127.0.0.1:8765"
OWNER = {"id": "4242424242", "username": ACCOUNT}
REPOSTED = 3  # the post whose picture the last post shows again
SCENES_FILE = "scenes.tsv"  # what each image shows: the truth the demo's tests check answers against
TEXTS_FILE = "texts.tsv"    # the posters: the text printed in each (their captions do not repeat it)
# Posters after the shape posts: an event and a sale, found only by the words in the picture
POSTERS = [
    (["OPEN STUDIO", "Saturday 12 July", "Harbour Hall, 2 pm"],
     "Come and say hi: prints, tea and good company. See you there! #event #minimal"),
    (["PRINT SALE", "20% off everything", "this week only"], "Treat yourself, link in bio #shop #art"),
]

_OPENERS = [
    "Found this {color} {shape} on a {background} wall today",
    "Minimal mood: one {color} {shape}, {background} all around",
    "Can't stop drawing {shape}s. This one is {color} on {background}",
    "Weekend project: a {color} {shape} against {background}",
    "Simple shapes, simple life. {color} {shape} + {background}",
    "New print in the shop! {color} {shape} on {background} paper",
]
_EXTRA_TAGS = ["minimal", "geometry", "art", "design", "shapes", "colour", "abstract"]


def _caption(scene: synthetic.Scene, rng: random.Random, prefix: str = "", suffix: str = "") -> str:
    text = prefix + rng.choice(_OPENERS).format(**vars(scene)) + suffix
    tags = [scene.color, scene.shape, *rng.sample(_EXTRA_TAGS, 2)]
    mention = " with @studio.shapes" if rng.random() < 0.2 else ""
    return f"{text}{mention} " + " ".join(f"#{t}" for t in tags)


def _node(shortcode: str, post_id: int, taken_at: datetime, caption: str, url: str,
          rng: random.Random, *, typename: str = "GraphImage", alt: str | None = None,
          children: list[dict[str, Any]] | None = None, video_url: str | None = None) -> dict:
    """A complete GraphQL post node: instaloader never needs the network to read it."""
    node = {
        "__typename": typename, "id": str(post_id), "shortcode": shortcode,
        "owner": dict(OWNER), "taken_at_timestamp": int(taken_at.timestamp()),
        "display_url": url, "is_video": typename == "GraphVideo",
        "edge_media_to_caption": {"edges": [{"node": {"text": caption}}]},
        "edge_media_preview_like": {"count": rng.randint(3, 900)},
        "edge_media_to_comment": {"count": rng.randint(0, 40)},
        "edge_media_to_tagged_user": {"edges": []},
        "accessibility_caption": alt, "location": None,
    }
    if video_url:
        node["video_url"] = video_url
        node["video_view_count"] = rng.randint(100, 5000)
    if children is not None:
        node["edge_sidecar_to_children"] = {"edges": [{"node": c} for c in children]}
    return node


def _save_post(context: Any, node: dict, taken_at: datetime, dest: Path) -> None:
    """A post node as `instaloader --metadata-json` names and writes it."""
    instaloader.save_structure_to_file(instaloader.Post(context, node),
                                       str(dest / f"{taken_at:%Y-%m-%d_%H-%M-%S}_UTC.json"))


def build_sample(dest: Path = SAMPLE_DIR, posts: int = 30, seed: int = 7) -> None:
    """Render the sample profile: images plus instaloader JSON, written with instaloader."""
    rng = random.Random(seed)
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "images").mkdir(parents=True)
    context = offline_context()
    scenes = rng.sample(synthetic.all_scenes(), posts + 2)
    start = datetime(2026, 6, 1, 9, 0, tzinfo=timezone.utc)
    shown: dict[str, synthetic.Scene] = {}

    def image(name: str, scene: synthetic.Scene) -> str:
        synthetic.render(scene, 320, rng).save(dest / "images" / name, quality=88)
        shown[name] = scene
        return f"{RECORDED_BASE}/images/{name}"

    def repost(name: str, post: int) -> str:
        """The last post shows an earlier post's picture again, as accounts do: smaller and
        recompressed (another file, the same photo), which the duplicates analysis must find."""
        with Image.open(dest / "images" / f"CgDemo{post:04d}.jpg") as earlier:
            earlier.resize((240, 240), Image.Resampling.BICUBIC).save(dest / "images" / name, quality=60)
        shown[name] = shown[f"CgDemo{post:04d}.jpg"]
        return f"{RECORDED_BASE}/images/{name}"

    for i in range(posts):
        shortcode = f"CgDemo{i:04d}"
        taken_at = start + timedelta(days=i, hours=rng.randint(0, 10))
        scene = scenes[REPOSTED if i == posts - 1 else i]
        alt = f"May be an image of a {scene.shape}" if i % 4 == 0 else None
        url = repost(f"{shortcode}.jpg", REPOSTED) if i == posts - 1 else image(f"{shortcode}.jpg", scene)
        if i == 10:  # a carousel of three pictures
            children = [{"__typename": "GraphImage", "id": str(900 + j), "shortcode": f"{shortcode}c{j}",
                         "display_url": image(f"{shortcode}_{j}.jpg", s) if j else url,
                         "is_video": False}
                        for j, s in enumerate([scene, scenes[posts], scenes[posts + 1]])]
            node = _node(shortcode, 1000 + i, taken_at, _caption(scene, rng, suffix=" (swipe for more)"),
                         url, rng, typename="GraphSidecar", alt=alt, children=children)
        elif i == 20:  # a video: its thumbnail is the picture
            node = _node(shortcode, 1000 + i, taken_at, _caption(scene, rng, prefix="Watch it spin! "),
                         url, rng, typename="GraphVideo", alt=alt,
                         video_url=f"{RECORDED_BASE}/videos/{shortcode}.mp4")
        else:
            prefix = "Throwback! " if i == posts - 1 else ""
            node = _node(shortcode, 1000 + i, taken_at, _caption(scene, rng, prefix), url, rng, alt=alt)
        _save_post(context, node, taken_at, dest)
    profile = instaloader.Profile(context, {
        "id": OWNER["id"], "username": ACCOUNT, "full_name": "clipgram demo",
        "biography": "Shapes and colours, one a day. #minimal", "is_private": False,
        "edge_followed_by": {"count": 1234}, "edge_follow": {"count": 56},
        "edge_owner_to_timeline_media": {"count": posts + len(POSTERS)},
        "profile_pic_url_hd": f"{RECORDED_BASE}/images/CgDemo0000.jpg",
    })
    instaloader.save_structure_to_file(profile, str(dest / f"{ACCOUNT}_{OWNER['id']}.json"))
    (dest / SCENES_FILE).write_text("".join(
        f"{name}\t{s.shape}\t{s.color}\t{s.background}\n" for name, s in sorted(shown.items())))
    # with a generator of their own: the shape posts above stay as they were
    rng = random.Random(seed + 1)
    texts = {}
    for j, (lines, caption) in enumerate(POSTERS):
        i = posts + j
        shortcode, taken_at = f"CgDemo{i:04d}", start + timedelta(days=i, hours=rng.randint(0, 10))
        synthetic.poster(lines, 320, rng).save(dest / "images" / f"{shortcode}.jpg", quality=88)
        texts[f"{shortcode}.jpg"] = lines
        _save_post(context, _node(shortcode, 1000 + i, taken_at, caption, f"{RECORDED_BASE}/images/{shortcode}.jpg",
                                  rng), taken_at, dest)
    (dest / TEXTS_FILE).write_text("".join(f"{name}\t{' | '.join(lines)}\n" for name, lines in texts.items()))


def scenes(sample: Path = SAMPLE_DIR) -> dict[str, synthetic.Scene]:
    """The scene each of the sample's image files shows, by file name."""
    rows = (line.split("\t") for line in (sample / SCENES_FILE).read_text().splitlines())
    return {name: synthetic.Scene(shape, color, background) for name, shape, color, background in rows}


def texts(sample: Path = SAMPLE_DIR) -> dict[str, list[str]]:
    """The lines of text printed in each of the sample's posters, by file name."""
    rows = (line.split("\t") for line in (sample / TEXTS_FILE).read_text().splitlines())
    return {name: text.split(" | ") for name, text in rows}


def materialize(dest: Path, base_url: str, sample: Path = SAMPLE_DIR) -> Path:
    """Copy the recorded JSON to `dest` with its URLs pointing at `base_url`."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in sample.glob("*.json"):
        (dest / path.name).write_text(path.read_text().replace(RECORDED_BASE, base_url))
    return dest


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def serve(directory: Path) -> Iterator[str]:
    """Serve `directory` over HTTP on 127.0.0.1 (a free port); yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    build_sample()
    print(f"sample profile written to {SAMPLE_DIR}")
