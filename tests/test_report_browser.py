"""The search results page and the map page in real headless Chromium, driven over the DevTools
protocol: they render, every picture loads, links go to the posts, nothing errs."""

from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from clipgram.cli import main

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed: `make browser` (as root) or `apt-get install chromium`")

# --disable-dev-shm-usage: containers' small /dev/shm crashes Chromium's renderer
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--disable-dev-shm-usage", "--remote-debugging-port=0", "--window-size=1280,900"]
# A readiness wait, not a speed check: a cold start (page cache evicted by the model tests before
# it, fontconfig's first scan) took over 20 s on a loaded CI machine, 3 s here, 0.2 s warm.
STARTUP_S = 120


class Page:
    """One browser tab over a DevTools websocket: commands answered in order, events kept."""

    def __init__(self, ws: Any) -> None:
        self.ws, self.events, self._id = ws, [], 0

    def send(self, method: str, timeout: float = 15, **params: Any) -> dict:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=timeout))
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def wait_for(self, event: str, timeout: float = 15) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.0, deadline - time.monotonic())))
            self.events.append(message)
            if message.get("method") == event:
                return message["params"]

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions, failed requests and HTTP errors seen so far."""
        found = []
        for e in self.events:
            method, p = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(f"exception: {p['exceptionDetails'].get('text')}")
            elif method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                found.append(f"console.{p['type']}: {p['args']}")
            elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
                found.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
            elif method == "Network.loadingFailed":
                found.append(f"request failed: {p['errorText']}")
            elif method == "Network.responseReceived" and p["response"]["status"] >= 400:
                found.append(f"HTTP {p['response']['status']}: {p['response']['url']}")
        return found

    def fetched_images(self) -> set[str]:
        return {e["params"]["response"]["url"] for e in self.events
                if e.get("method") == "Network.responseReceived" and e["params"]["type"] == "Image"}


@contextmanager
def chromium(profile: Path) -> Iterator[Page]:
    """Headless Chromium with a fresh profile, attached to its first tab."""
    from websockets.sync.client import connect

    profile.mkdir(parents=True, exist_ok=True)
    log = profile / "chromium.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + STARTUP_S
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if proc.poll() is not None or time.monotonic() > deadline:
                what = (f"exited with {proc.returncode}" if proc.returncode is not None
                        else f"opened no DevTools port within {STARTUP_S} s")
                pytest.fail(f"chromium {what}:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            tab = next(t for t in json.load(r) if t["type"] == "page")
        with connect(tab["webSocketDebuggerUrl"], max_size=None, open_timeout=10) as ws:
            page = Page(ws)
            for domain in ("Page", "Runtime", "Log", "Network"):
                page.send(f"{domain}.enable")
            yield page
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def serve(root: Path) -> Iterator[str]:
    """A static file server on 127.0.0.1 (quiet: its request log would drown pytest's output)."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


# Scroll to the end (lazy images start loading), then settle once every image has loaded or failed.
ALL_IMAGES_SETTLED = """(async () => {
  window.scrollTo(0, document.body.scrollHeight);
  await Promise.all([...document.images].map(img => img.complete ? null :
    new Promise(done => { img.addEventListener('load', done); img.addEventListener('error', done); })));
  window.scrollTo(0, 0);
})()"""


def _open(page: Page, url: str) -> None:
    page.send("Page.navigate", url=url)
    page.wait_for("Page.loadEventFired")


def _url(base: str, root: Path, path: str | Path) -> str:
    return f"{base}/{urllib.parse.quote(Path(os.path.relpath(path, root)).as_posix())}"


def _cli(cfg, *argv: str) -> int:
    return main([*argv, "--data-dir", str(cfg.data_dir), "--clip-model", "tiny", "--captioner", "tiny",
                 "--device", "cpu"])


def test_results_page_renders_with_every_thumbnail(ingested_sample, tmp_path, capsys):
    cfg = ingested_sample
    page_file = tmp_path / "pages" / "results.html"
    capsys.readouterr()
    assert _cli(cfg, "search", "a red circle", "-k", "12", "--json", "--html", str(page_file)) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 12

    # one server over the page and the data directory, so the page's relative links resolve
    root = Path(os.path.commonpath([page_file, cfg.data_dir]))
    with serve(root) as base, chromium(tmp_path / "profile") as page:
        page.send("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1,
                  mobile=False)
        _open(page, _url(base, root, page_file))
        page.evaluate(ALL_IMAGES_SETTLED)
        shown = page.evaluate("""({
          title: document.title,
          heading: document.querySelector('h2').textContent,
          cards: [...document.querySelectorAll('figure')].map(f => ({
            href: f.querySelector('a').href, src: f.querySelector('img').src,
            width: f.querySelector('img').naturalWidth, text: f.querySelector('figcaption').textContent,
            cut: f.querySelector('.who').scrollWidth > f.querySelector('.who').clientWidth})),
          overflow: document.documentElement.scrollWidth > window.innerWidth})""")
        shot = page.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        (tmp_path / "results.png").write_bytes(base64.b64decode(shot["data"]))

        assert page.problems() == []
        assert shown["title"] == "clipgram results" and "a red circle" in shown["heading"]
        assert [c["href"] for c in shown["cards"]] == [h["permalink"] for h in hits]
        assert [c["src"] for c in shown["cards"]] == [_url(base, root, h["path"]) for h in hits]
        assert all(c["width"] > 0 for c in shown["cards"]), "a thumbnail did not load"
        assert page.fetched_images() == {c["src"] for c in shown["cards"]}
        for card, hit in zip(shown["cards"], hits):
            assert f"#{hit['rank']}" in card["text"] and hit["account"] in card["text"]
            assert f"{hit['score']:.3f}" in card["text"] and " ".join(hit["caption"].split()) in card["text"]
        assert not shown["overflow"], "the page scrolls sideways at 1280 px"
        assert not any(c["cut"] for c in shown["cards"]), "a short account name is cut off"

        empty_file = page_file.with_name("empty.html")
        assert _cli(cfg, "search", "a red circle", "--account", "someone.else", "--html", str(empty_file)) == 0
        _open(page, _url(base, root, empty_file))
        assert page.evaluate("document.querySelector('.grid').innerText") == "No results."
        assert page.problems() == []


def test_map_page_renders_with_every_thumbnail(ingested_sample, tmp_path):
    cfg = ingested_sample
    png = tmp_path / "pages" / "map.png"
    assert _cli(cfg, "map", "--out", str(png)) == 0
    page_file = png.with_suffix(".html")

    root = Path(os.path.commonpath([page_file, cfg.data_dir]))
    with serve(root) as base, chromium(tmp_path / "profile") as page:
        _open(page, _url(base, root, page_file))
        shown = page.evaluate("""(async () => {
          const images = [...document.querySelectorAll('svg image')];
          // an SVG <image> has no naturalWidth: decode each one's picture to prove it loads
          const sizes = await Promise.all(images.map(i => {
            const img = new Image(); img.src = i.href.baseVal;
            return img.decode().then(() => img.naturalWidth, () => 0); }));
          return {title: document.title, sizes, srcs: images.map(i => new URL(i.href.baseVal, location).href),
                  links: images.map(i => i.closest('a').getAttribute('href')),
                  box: document.querySelector('svg').getBoundingClientRect().height};
        })()""")
        embedded = len(shown["srcs"])
        assert page.problems() == []
        assert shown["title"].startswith("clipgram map")
        assert embedded > 20 and all(s > 0 for s in shown["sizes"]), "a map thumbnail did not load"
        assert page.fetched_images() == set(shown["srcs"])
        assert all(link.startswith("https://www.instagram.com/p/") for link in shown["links"])
        assert shown["box"] > 500, "the map is not drawn at a usable size"
