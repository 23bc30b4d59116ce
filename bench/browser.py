"""Headless Chromium driven over the DevTools protocol: the page tests and the app bench."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
needs_chromium = pytest.mark.skipif(
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



# Scroll to the end (lazy images start loading), then settle once every image has loaded or failed.
ALL_IMAGES_SETTLED = """(async () => {
  window.scrollTo(0, document.body.scrollHeight);
  await Promise.all([...document.images].map(img => img.complete ? null :
    new Promise(done => { img.addEventListener('load', done); img.addEventListener('error', done); })));
  window.scrollTo(0, 0);
})()"""


def open_page(page: Page, url: str) -> None:
    page.send("Page.navigate", url=url)
    page.wait_for("Page.loadEventFired")
