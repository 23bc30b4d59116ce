"""Real inputs that other people produced, and the local server their URLs are pointed at.

The samples are not in this repository: files taken from public repositories live
in the steering repo's shared/ (`shared/samples/`, laid out as tests/SAMPLES.md lists,
with each file's repository, commit, path and licence), which CI copies beside the
clone. `CLIPGRAM_SAMPLES` points elsewhere. Tests that need a kind of sample skip,
saying so, where it is absent.
"""

from __future__ import annotations

import hashlib
import lzma
import re
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bench.odd_images import SAMPLES


def sample_dir(kind: str) -> Path:
    """`SAMPLES/kind`, or a skip naming what is missing."""
    path = SAMPLES / kind
    if not path.is_dir():
        pytest.skip(f"real samples not found at {path} (see tests/SAMPLES.md; CLIPGRAM_SAMPLES)")
    return path


def sample_sets(kind: str) -> list[str]:
    """The names of the sample sets of `kind` (for parametrize: empty when absent)."""
    path = SAMPLES / kind
    return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []


# Instagram's image and video CDNs; other URLs (in captions, say) stay as recorded
_URL = re.compile(r"https?://([A-Za-z0-9.-]+\.(?:cdninstagram\.com|fbcdn\.net))/")


def point_at(source: Path, dest: Path, base_url: str) -> Path:
    """Copy a recorded instaloader folder with every CDN URL's host moved under `base_url`
    (https://x.cdninstagram.com/p → base_url/x.cdninstagram.com/p); the rest stays as recorded."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        xz = path.name.endswith(".xz")
        text = (lzma.open(path, "rt", encoding="utf-8") if xz else open(path, encoding="utf-8")).read()
        text = _URL.sub(lambda m: f"{base_url}/{m.group(1)}/", text)
        with (lzma.open(dest / path.name, "wt", encoding="utf-8") if xz
              else open(dest / path.name, "w", encoding="utf-8")) as out:
            out.write(text)
    return dest


class Cdn:
    """Answers every GET with one of `images` (chosen by the path), counting requests per path."""

    def __init__(self, images: list[Path]):
        self.bodies = [p.read_bytes() for p in images]
        self.requests: Counter[str] = Counter()
        self.base_url = ""


@contextmanager
def serve_cdn(images: list[Path]) -> Iterator[Cdn]:
    cdn = Cdn(images)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            cdn.requests[path] += 1
            body = cdn.bodies[int(hashlib.sha256(path.encode()).hexdigest(), 16) % len(cdn.bodies)]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cdn.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield cdn
    finally:
        server.shutdown()
        server.server_close()
