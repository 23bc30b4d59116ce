"""The search results page and the map page in real headless Chromium, driven over the DevTools
protocol: they render, every picture loads, links go to the posts, nothing errs."""

from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import threading
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from bench.browser import ALL_IMAGES_SETTLED, chromium, needs_chromium, open_page
from clipgram.cli import main

pytestmark = needs_chromium


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
        open_page(page, _url(base, root, page_file))
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
        open_page(page, _url(base, root, empty_file))
        assert page.evaluate("document.querySelector('.grid').innerText") == "No results."
        assert page.problems() == []


def test_map_page_renders_with_every_thumbnail(ingested_sample, tmp_path):
    cfg = ingested_sample
    png = tmp_path / "pages" / "map.png"
    assert _cli(cfg, "map", "--out", str(png)) == 0
    page_file = png.with_suffix(".html")

    root = Path(os.path.commonpath([page_file, cfg.data_dir]))
    with serve(root) as base, chromium(tmp_path / "profile") as page:
        open_page(page, _url(base, root, page_file))
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
