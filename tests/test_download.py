"""The downloader against a real HTTP server on 127.0.0.1 that injects faults."""

import io
import re
import socket
import struct
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from clipgram import tables
from clipgram.config import defaults
from clipgram.stages import download

ACCOUNT = "faults"


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, "JPEG")
    return buf.getvalue()


RED, BLUE, GREEN = _jpeg((255, 0, 0)), _jpeg((0, 0, 255)), _jpeg((0, 255, 0))
MP4 = struct.pack(">I", 24) + b"ftypisom" + b"\0" * 12 + b"moov-and-more"


class Faults(BaseHTTPRequestHandler):
    """Each path is one behaviour; `hits` counts requests per path."""

    hits: dict[str, int] = {}

    def _send(self, status, body, kind="image/jpeg", length=None, headers=()):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _reset(self, body):
        """Send half the body, then reset the connection (RST, not a clean close)."""
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def _chunks(self, chunk, count, pause):
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for _ in range(count):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()
            time.sleep(pause)
        self.wfile.write(b"0\r\n\r\n")

    def do_GET(self):
        hits = Faults.hits[self.path] = Faults.hits.get(self.path, 0) + 1
        path = self.path
        if path in ("/red.jpg", "/red-again.jpg"):
            return self._send(200, RED)
        if path == "/blue.jpg":
            return self._send(200, BLUE)
        if path == "/flaky.jpg":  # 500, then the image
            return self._send(500, b"oops", "text/plain") if hits == 1 else self._send(200, BLUE)
        if path == "/reset.jpg":  # connection reset mid-body, then the image
            return self._reset(GREEN) if hits == 1 else self._send(200, GREEN)
        if path == "/always-reset.jpg":
            return self._reset(GREEN)
        if path == "/slow.jpg":  # answers after the client's timeout
            time.sleep(1.5)
            return self._send(200, RED)
        if path == "/octet.jpg":  # a JPEG with an unhelpful content type: the bytes decide
            return self._send(200, GREEN, "application/octet-stream")
        if path == "/login.jpg":  # HTML that says it is a JPEG
            return self._send(200, b"<!DOCTYPE html><html><body>Log in to see this</body></html>")
        if path == "/truncated.jpg":  # half a JPEG, honestly sized
            return self._send(200, RED[: len(RED) // 2])
        if path == "/short-body.jpg":  # fewer bytes than Content-Length, then close
            return self._send(200, RED[: len(RED) // 2], length=len(RED))
        if path == "/empty.jpg":
            return self._send(200, b"")
        if path == "/svg.jpg":  # an image format Pillow cannot decode
            return self._send(200, b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>')
        if path == "/down.jpg":
            return self._send(503, b"busy", "text/plain")
        if path == "/moved.jpg":
            return self._send(302, b"", headers=[("Location", "/blue.jpg")])
        if path == "/to-file.jpg":
            return self._send(302, b"", headers=[("Location", "file:///etc/passwd")])
        if path == "/loop.jpg":
            return self._send(302, b"", headers=[("Location", "/loop.jpg")])
        if path == "/huge.jpg":  # says it is larger than any photo
            return self._send(200, RED, length=10**12)
        if path == "/endless.jpg":  # no length, a body that would not end (bounded here: 4 MB)
            return self._chunks(RED + b"\0" * 65536, 64, pause=0)
        if path == "/trickle.jpg":  # a byte at a time, each well within the read timeout
            return self._chunks(b"\xff", 40, pause=0.1)
        if path == "/clip.mp4":
            return self._send(200, MP4, "video/mp4")
        return self._send(404, b"not found", "text/plain")

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on /slow.jpg
            pass

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


FAST = defaults().replace("download", concurrency=4, timeout_s=0.5, retries=2, allow_private_network=True).download
# path → (status, text the error must contain; None when done)
CASES = {
    "red": ("done", None), "red-again": ("done", None), "blue": ("done", None),
    "flaky": ("done", None), "reset": ("done", None), "octet": ("done", None),
    "moved": ("done", None),
    "missing": ("failed", "404"), "down": ("failed", "503"),
    "slow": ("failed", "Timeout"), "always-reset": ("failed", "Error"),
    "login": ("failed", "HTML page"), "truncated": ("failed", "truncated"),
    "short-body": ("failed", "complete message body"), "empty": ("failed", "empty file"),
    "svg": ("failed", "not an image"), "to-file": ("failed", "non-http(s)"),
    "loop": ("failed", "redirects"),
}


def _queue(data_dir, base, names, account=ACCOUNT):
    tables.write_part(data_dir, tables.MEDIA, account, [
        {"media_id": f"{n}_0", "shortcode": n, "position": 0, "url": f"{base}/{n}.jpg", "status": "pending"}
        for n in names])


def _media(data_dir, account=ACCOUNT):
    con = tables.connect(data_dir)
    return {r[0]: r[1:] for r in con.execute(
        "SELECT shortcode, status, error, sha256, path FROM media WHERE account = ?", [account]).fetchall()}


def test_each_fault_ends_in_the_right_row_and_the_rest_download(tmp_path, server):
    _queue(tmp_path, server, CASES)
    result = download.download(tmp_path, ACCOUNT, FAST)
    media = _media(tmp_path)
    for name, (status, error) in CASES.items():
        assert media[name][0] == status, (name, media[name])
        if error:
            assert error.lower() in media[name][1].lower(), (name, media[name][1])
        else:
            assert media[name][1] is None and (tmp_path / media[name][3]).is_file()
    done = sum(s == "done" for s, _ in CASES.values())
    assert (result.done, result.failed) == (done, len(CASES) - done)
    assert Faults.hits["/missing.jpg"] == 1                  # no retry on 4xx
    assert Faults.hits["/down.jpg"] == 1 + FAST.retries      # retried on 5xx, then given up
    assert Faults.hits["/flaky.jpg"] == Faults.hits["/reset.jpg"] == 2
    assert Faults.hits["/short-body.jpg"] == 1 + FAST.retries  # an incomplete body is transient
    # content-addressed: the same picture under two URLs (and a redirect) is one file
    assert media["red"][2:] == media["red-again"][2:]
    assert media["moved"][2:] == media["blue"][2:]
    stored = sorted(p for p in (tmp_path / "media").rglob("*") if p.is_file())
    assert len(stored) == 3 and all(p.suffix == ".jpg" for p in stored)  # red, blue, green
    assert (tmp_path / media["blue"][3]).read_bytes() == BLUE
    assert not list((tmp_path / "media").glob(".*.tmp"))  # no temp file left behind
    assert tables.connect(tmp_path).execute(
        "SELECT count(*), count(DISTINCT media_id) FROM media").fetchone() == (len(CASES), len(CASES))


def test_a_body_too_large_or_too_slow_is_refused_whatever_the_headers_say(tmp_path, server):
    hostile = replace(FAST, max_bytes=200_000, deadline_s=1.0)
    names = ["huge", "endless", "trickle", "loop", "red"]
    _queue(tmp_path, server, names)
    result = download.download(tmp_path, ACCOUNT, hostile)
    media = _media(tmp_path)
    assert "download.max_bytes" in media["huge"][1] and "1,000,000,000,000" in media["huge"][1]
    assert "download.max_bytes" in media["endless"][1]
    assert "download.deadline_s" in media["trickle"][1]
    assert int(re.search(r"after (\d+) bytes", media["trickle"][1])[1]) < 40  # cut before its end
    assert "redirect loop" in media["loop"][1]
    assert media["red"][0] == "done" and (result.done, result.failed) == (1, 4)
    # refusals are not retried: what a server did on purpose it will do again
    assert Faults.hits["/huge.jpg"] == Faults.hits["/endless.jpg"] == Faults.hits["/trickle.jpg"] == 1
    assert not list((tmp_path / "media").glob(".*.tmp"))
    assert download.download(tmp_path, ACCOUNT, hostile).done == 0  # a rerun: nothing left to do


def test_rerun_downloads_nothing_and_writes_nothing(tmp_path, server):
    names = ["red", "blue", "missing"]
    _queue(tmp_path, server, names)
    download.download(tmp_path, ACCOUNT, FAST)
    parts = sorted((tmp_path / "tables").rglob("*.parquet"))
    hits = dict(Faults.hits)
    result = download.download(tmp_path, ACCOUNT, FAST)
    assert (result.done, result.failed) == (0, 0)
    assert Faults.hits == hits
    assert sorted((tmp_path / "tables").rglob("*.parquet")) == parts


def test_a_url_already_stored_is_not_fetched_again_even_for_another_account(tmp_path, server):
    _queue(tmp_path, server, ["red"])
    download.download(tmp_path, ACCOUNT, FAST)
    _queue(tmp_path, server, ["red"], account="other")
    assert download.download(tmp_path, "other", FAST).done == 1
    assert Faults.hits["/red.jpg"] == 1
    assert _media(tmp_path, "other")["red"][2:] == _media(tmp_path)["red"][2:]


def test_a_file_missing_from_the_store_is_fetched_again(tmp_path, server):
    _queue(tmp_path, server, ["red"])
    download.download(tmp_path, ACCOUNT, FAST)
    stored = tmp_path / _media(tmp_path)["red"][3]
    stored.unlink()
    assert download.download(tmp_path, ACCOUNT, FAST).done == 1
    assert stored.read_bytes() == RED and Faults.hits["/red.jpg"] == 2
    assert tables.connect(tmp_path).execute("SELECT count(*) FROM media").fetchone() == (1,)


def test_local_addresses_are_refused_unless_allowed(tmp_path, server):
    _queue(tmp_path, server, ["red"])
    strict = defaults().replace("download", concurrency=2, timeout_s=2, retries=0).download
    assert download.download(tmp_path, ACCOUNT, strict).failed == 1
    status, error, *_ = _media(tmp_path)["red"]
    assert status == "failed" and "allow-private-network" in error
    assert Faults.hits == {}  # refused before any request


@pytest.mark.parametrize("url, allowed", [
    ("http://8.8.8.8/a.jpg", True), ("https://[2606:4700::1111]/a.jpg", True),
    ("http://127.0.0.1/a.jpg", False), ("http://10.1.2.3/a.jpg", False),
    ("http://192.168.0.10/a.jpg", False), ("http://169.254.169.254/latest/meta-data", False),
    ("http://[::1]/a.jpg", False), ("http://localhost/a.jpg", False),
])
def test_check_url_refuses_private_and_loopback_addresses(url, allowed):
    if allowed:
        assert str(download.check_url(url, allow_private_network=False)) == url
    else:
        with pytest.raises(download.DownloadError, match="local or private address"):
            download.check_url(url, allow_private_network=False)
        download.check_url(url, allow_private_network=True)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.jpg", "gopher://x/"])
def test_non_http_urls_are_refused_even_when_private_networks_are_allowed(tmp_path, url):
    tables.write_part(tmp_path, tables.MEDIA, ACCOUNT, [
        {"media_id": "f_0", "shortcode": "f", "position": 0, "url": url, "status": "pending"}])
    download.download(tmp_path, ACCOUNT, FAST)
    assert _media(tmp_path)["f"][:2] == ("failed", f"refusing non-http(s) URL {url!r}")


def test_videos_are_fetched_only_when_asked(tmp_path, server):
    tables.write_part(tmp_path, tables.MEDIA, ACCOUNT, [
        {"media_id": "v_0", "shortcode": "v", "position": 0, "url": f"{server}/red.jpg",
         "is_video": True, "video_url": f"{server}/clip.mp4", "status": "pending"},
        {"media_id": "w_0", "shortcode": "w", "position": 0, "url": f"{server}/blue.jpg",
         "is_video": True, "video_url": f"{server}/missing.mp4", "status": "pending"}])
    download.download(tmp_path, ACCOUNT, FAST)
    assert "/clip.mp4" not in Faults.hits
    with_videos = replace(FAST, videos=True)
    download.download(tmp_path, ACCOUNT, with_videos)
    rows = {r[0]: r[1:] for r in tables.connect(tmp_path).execute(
        "SELECT shortcode, status, video_path, error FROM media").fetchall()}
    assert rows["v"][0] == "done" and (tmp_path / rows["v"][1]).read_bytes() == MP4
    assert rows["w"][0] == "done" and rows["w"][1] is None and "404" in rows["w"][2]  # thumbnail kept
    hits = dict(Faults.hits)
    download.download(tmp_path, ACCOUNT, with_videos)  # the missing video is tried again, not the rest
    assert Faults.hits["/clip.mp4"] == hits["/clip.mp4"] and Faults.hits["/red.jpg"] == hits["/red.jpg"]
