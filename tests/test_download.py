import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from pipeline import download, tables

ACCOUNT = "faults"


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, "JPEG")
    return buf.getvalue()


RED, BLUE = _jpeg((255, 0, 0)), _jpeg((0, 0, 255))


class Faults(BaseHTTPRequestHandler):
    """/red.jpg, /blue.jpg, /red-again.jpg (same bytes as red), /flaky.jpg (500 once),
    /missing.jpg (404), /login.jpg (HTML), /truncated.jpg, /down.jpg (always 503)."""

    hits: dict[str, int] = {}

    def do_GET(self):
        hits = Faults.hits[self.path] = Faults.hits.get(self.path, 0) + 1
        body, status, kind = {
            "/red.jpg": (RED, 200, "image/jpeg"),
            "/red-again.jpg": (RED, 200, "image/jpeg"),
            "/blue.jpg": (BLUE, 200, "image/jpeg"),
            "/flaky.jpg": (BLUE if hits > 1 else b"oops", 200 if hits > 1 else 500, "image/jpeg"),
            "/login.jpg": (b"<html><body>Log in to see this</body></html>", 200, "text/html"),
            "/truncated.jpg": (RED[: len(RED) // 2], 200, "image/jpeg"),
            "/down.jpg": (b"busy", 503, "text/plain"),
        }.get(self.path, (b"not found", 404, "text/plain"))
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Faults.hits = {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Faults)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


NAMES = ["red", "red-again", "blue", "flaky", "missing", "login", "truncated", "down"]
FAST = download.DownloadSettings(concurrency=4, timeout_s=5, retries=2)


def _queue(data_dir, base):
    tables.write_part(data_dir, tables.MEDIA, ACCOUNT, [
        {"media_id": f"{n}_0", "shortcode": n, "position": 0, "url": f"{base}/{n}.jpg", "status": "pending"}
        for n in NAMES])


def _media(data_dir):
    con = tables.connect(data_dir)
    return {r[0]: r[1:] for r in con.execute(
        "SELECT shortcode, status, error, sha256, path FROM media").fetchall()}


def test_each_fault_is_recorded_and_the_rest_download(tmp_path, server):
    _queue(tmp_path, server)
    result = download.download(tmp_path, ACCOUNT, FAST)
    media = _media(tmp_path)
    assert {n for n, m in media.items() if m[0] == "done"} == {"red", "red-again", "blue", "flaky"}
    assert (result.done, result.failed) == (4, 4)
    assert "404" in media["missing"][1]
    assert "not an image" in media["login"][1]
    assert "truncated" in media["truncated"][1]
    assert "503" in media["down"][1]
    assert Faults.hits["/missing.jpg"] == 1            # no retry on 4xx
    assert Faults.hits["/down.jpg"] == 1 + FAST.retries  # retried on 5xx, then given up
    # content-addressed: the same picture under two URLs is one file
    assert media["red"][2] == media["red-again"][2] and media["red"][3] == media["red-again"][3]
    stored = sorted(p.name for p in (tmp_path / "media").rglob("*") if p.is_file())
    assert len(stored) == 2 and all(name.endswith(".jpg") for name in stored)
    assert (tmp_path / media["blue"][3]).read_bytes() == BLUE


def test_rerun_downloads_nothing_and_writes_nothing(tmp_path, server):
    _queue(tmp_path, server)
    download.download(tmp_path, ACCOUNT, FAST)
    parts = sorted((tmp_path / "tables").rglob("*.parquet"))
    hits = dict(Faults.hits)
    result = download.download(tmp_path, ACCOUNT, FAST)
    assert (result.done, result.failed) == (0, 0)
    assert Faults.hits == hits
    assert sorted((tmp_path / "tables").rglob("*.parquet")) == parts
    assert len(tables.connect(tmp_path).execute("SELECT * FROM media").fetchall()) == len(NAMES)


def test_non_http_urls_are_refused(tmp_path):
    tables.write_part(tmp_path, tables.MEDIA, ACCOUNT, [
        {"media_id": "f_0", "shortcode": "f", "position": 0, "url": "file:///etc/passwd", "status": "pending"}])
    download.download(tmp_path, ACCOUNT, FAST)
    assert _media(tmp_path)["f"][:2] == ("failed", "refusing non-http(s) URL 'file:///etc/passwd'")
