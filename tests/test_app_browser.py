"""The app in real headless Chromium: type a query and see the right image first, "more like
this", a filter, the map and a click on a point, an account's status. Writes the README's
screenshot when asked to (CLIPGRAM_SCREENSHOT=path)."""

from __future__ import annotations

import base64
import os
import time
import urllib.parse
from pathlib import Path

import httpx

from bench.browser import ALL_IMAGES_SETTLED, chromium, needs_chromium, open_page
from clipgram import demo, synthetic
from clipgram.app import library, server

pytestmark = needs_chromium

CARDS = "[...document.querySelectorAll('#results .card')].map(c => ({media: c.querySelector('a').href, " \
        "caption: c.querySelector('.caption').textContent, meta: c.querySelector('.meta').textContent}))"
# the matches and the closest that do not match (shown or not): every result of a search
EVERY_CARD = CARDS.replace("'#results .card'", "'#results .card, #closest-results .card'")


def _until(page, expression: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(expression)
        if value:
            return value
        assert time.monotonic() < deadline, f"never true: {expression}"
        time.sleep(0.1)


def _type(page, text: str) -> None:
    page.evaluate("document.querySelector('#q').focus()")
    page.send("Input.insertText", text=text)
    page.evaluate("document.querySelector('#search-form button[type=submit]').click()")


def _click(page, x: float, y: float) -> None:
    for kind in ("mousePressed", "mouseReleased"):
        page.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)


def _media(card_href: str) -> str:
    return urllib.parse.unquote(card_href.rsplit("/image/", 1)[1])


def test_search_more_like_this_filters_map_and_status(app_library, ingested_sample, tmp_path):
    lib = library.Library(app_library, ingested_sample.models)
    # the posters show no shape: a scene no query names
    shown = {**demo.scenes(), **{name: synthetic.Scene("poster", "text", "paper") for name in demo.texts()}}
    with server.running(lib) as url, chromium(tmp_path / "profile") as page, httpx.Client(base_url=url) as api:
        def scene_of(media_id):
            image = api.get(f"/api/image/{media_id}").json()["image"]
            url_of = {r[0]: r[1] for r in lib.cursor().execute("SELECT media_id, url FROM media").fetchall()}
            return image, shown[url_of[media_id].rsplit("/", 1)[1]]

        page.send("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
        open_page(page, url + "/")
        _type(page, "a red square")
        cards = _until(page, f"location.search.includes('q=') && {CARDS}.length && {CARDS}")
        assert "q=a+red+square" in page.evaluate("location.search")  # the URL holds the query
        _, scene = scene_of(_media(cards[0]["media"]))
        assert (scene.color, scene.shape) == ("red", "square")
        page.evaluate(ALL_IMAGES_SETTLED)
        assert page.evaluate("[...document.querySelectorAll('#results img')].every(i => i.naturalWidth > 0)")
        shot = page.send("Page.captureScreenshot", format="png")
        if os.environ.get("CLIPGRAM_SCREENSHOT"):
            Path(os.environ["CLIPGRAM_SCREENSHOT"]).write_bytes(base64.b64decode(shot["data"]))

        # the results judged not to match wait behind a button; a query nothing matches shows them at once
        closest = "[...document.querySelectorAll('#closest-results .card')]"
        assert page.evaluate("!document.querySelector('#closest').hidden && "
                             "document.querySelector('#closest-results').hidden")
        page.evaluate("document.querySelector('#show-closest').click()")
        assert page.evaluate(f"{closest}.length") == 24 - len(cards)
        assert all((lambda s: (s.color, s.shape))(scene_of(_media(c["media"]))[1]) == ("red", "square")
                   for c in cards)

        # more like this, on the first result
        first = _media(cards[0]["media"])
        page.evaluate("document.querySelector('#results .card .more').click()")
        similar = _until(page, "location.search.includes('like=') && "
                               f"document.querySelector('#search-note').textContent.includes('results') && {CARDS}")
        assert first not in {_media(c["media"]) for c in similar}
        page.evaluate("history.back()")
        _until(page, "location.search.includes('q=a+red+square')")

        # a filter: at least 500 likes
        page.evaluate("""(() => { const f = document.querySelector('[name=min_likes]');
                         f.value = '500'; f.dispatchEvent(new Event('change')); })()""")
        liked = _until(page, "location.search.includes('min_likes=500') && "
                             f"document.querySelector('#search-note').textContent.includes('results') && {EVERY_CARD}")
        assert liked and all(int(c["meta"].split("♥ ")[1].split(" ")[0]) >= 500 for c in liked)

        # the map: few points, so pictures at once, each in its cluster's colour; the legend hides one
        open_page(page, url + "/map")
        drawn = _until(page, "map.points.length && map.drawn <= THUMBS_AT && [...map.thumbs.values()]"
                             ".filter(i => i.complete && i.naturalWidth > 0).length === map.drawn && map.drawn")
        assert drawn == len(page.evaluate("map.points"))
        legend = page.evaluate("[...document.querySelectorAll('#map-legend .legend')].map(b => b.textContent)")
        assert len(legend) == 3 and all("(" in name and "_all" not in name for name in legend)
        page.evaluate("document.querySelector('#map-legend .legend').click()")
        _until(page, f"map.hidden.size === 1 && map.drawn < {drawn}")
        page.evaluate("document.querySelector('#map-legend .legend').click()")
        _until(page, f"map.hidden.size === 0 && map.drawn === {drawn}")
        # the wheel zooms in about the pointer: fewer pictures on screen, each larger
        centre = page.evaluate("""(() => { const r = document.querySelector('#map').getBoundingClientRect();
            return [r.left + r.width / 2, r.top + r.height / 2]; })()""")
        for _ in range(6):
            page.send("Input.dispatchMouseEvent", type="mouseWheel", x=centre[0], y=centre[1], deltaX=0, deltaY=-120)
        assert _until(page, "map.scale > 2 && map.drawn") < drawn
        page.evaluate("map.scale = 1; map.dx = map.dy = 0; drawMap()")
        # shift-drag a box round every point: its images, as a result page
        corners = page.evaluate("""(() => { const r = document.querySelector('#map').getBoundingClientRect();
            return [r.left + 2, r.top + 2, r.right - 2, r.bottom - 2]; })()""")
        page.send("Input.dispatchMouseEvent", type="mousePressed", x=corners[0], y=corners[1], button="left",
                  clickCount=1, modifiers=8)
        page.send("Input.dispatchMouseEvent", type="mouseMoved", x=corners[2], y=corners[3], button="left",
                  buttons=1, modifiers=8)
        page.send("Input.dispatchMouseEvent", type="mouseReleased", x=corners[2], y=corners[3], button="left",
                  clickCount=1, modifiers=8)
        note = _until(page, "location.search.includes('region=') && "
                            "document.querySelector('#search-note').textContent.includes('images') && "
                            "document.querySelector('#search-note').textContent")
        assert note.startswith(f"Selected on the map · {drawn} images")
        assert len(_until(page, CARDS)) == min(drawn, 24)

        # a click on a point opens its image
        open_page(page, url + "/map")
        point = _until(page, """map.points.length && (() => { const c = document.querySelector('#map');
            const r = c.getBoundingClientRect(); const [x, y] = mapXY(map.points[0], c);
            return {x: r.left + x * r.width / c.width, y: r.top + y * r.height / c.height,
                    media: map.points[0].media_id}; })()""")
        _click(page, point["x"], point["y"])
        _until(page, f"location.pathname === '/image/{point['media']}' && "
                     "document.querySelector('#neighbours .card') !== null")
        assert page.evaluate("document.querySelector('#image-full').naturalWidth") > 0 or \
            _until(page, "document.querySelector('#image-full').naturalWidth > 0")

        # a query nothing in the demo matches says so, and shows the closest at once
        open_page(page, url + "/?q=a+white+circle")
        note = _until(page, "document.querySelector('#search-note').textContent.includes('None of') && "
                            "document.querySelector('#search-note').textContent")
        assert "a white circle" in note and page.evaluate(f"{CARDS}.length") == 0
        assert page.evaluate("!document.querySelector('#closest-results').hidden && "
                             "document.querySelectorAll('#closest-results .card').length") > 0

        # an account's status
        open_page(page, url + "/explore")
        rows = _until(page, "[...document.querySelectorAll('#stages tbody tr')].map(r => r.innerText)")
        assert any(demo.ACCOUNT in r and "embed" in r for r in rows)
        assert _until(page, "document.querySelectorAll('#clusters .cluster').length") == 3
        explore = page.evaluate("document.querySelector('main').innerText")
        assert "all accounts" in explore and "_all_accounts" not in explore  # no internal names
        # named clusters with their pictures; one opens as a result page under its name
        page.evaluate(ALL_IMAGES_SETTLED)
        assert page.evaluate("[...document.querySelectorAll('#clusters img')].every(i => i.naturalWidth > 0)")
        name, size = page.evaluate("""(() => { const h = document.querySelector('#clusters h3');
            return [h.querySelector('a').textContent, Number(h.textContent.split(' · ')[1].split(' ')[0])]; })()""")
        page.evaluate("document.querySelector('#clusters h3 a').click()")
        note = _until(page, "location.search.includes('cluster=') && "
                            "document.querySelector('#search-note').textContent.includes('images') && "
                            "document.querySelector('#search-note').textContent")
        assert note == f"{name} · {size} images" and len(_until(page, CARDS)) == min(size, 24)
        assert page.problems() == []


def test_filters_read_from_the_query_show_as_chips_that_remove_them(app_library, ingested_sample, tmp_path):
    lib = library.Library(app_library, ingested_sample.models)
    with server.running(lib) as url, chromium(tmp_path / "profile") as page:
        tagged = {m for m, in lib.cursor().execute(
            "SELECT media_id FROM images WHERE list_contains(hashtags, 'square')").fetchall()}
        open_page(page, url + "/")
        _type(page, "a red shape #square with over 100 likes")
        chips = _until(page, "[...document.querySelectorAll('#parsed .chip')].map(c => c.textContent)")
        assert chips == ["#square ×", "♥ ≥ 101 ×"]
        cards = _until(page, f"document.querySelector('#search-note').textContent.includes('results') && {EVERY_CARD}")
        assert {_media(c["media"]) for c in cards} <= tagged
        page.evaluate("document.querySelector('#parsed .chip').click()")  # without #square
        _until(page, "location.search.includes('literal=1')")
        params = dict(urllib.parse.parse_qsl(page.evaluate("location.search")[1:]))
        assert params["q"] == "a red shape" and params["min_likes"] == "101" and "hashtag" not in params
        cards = _until(page, f"document.querySelector('#search-note').textContent.includes('results') && {EVERY_CARD}")
        assert {_media(c["media"]) for c in cards} - tagged  # other shapes now
        assert page.evaluate("document.querySelectorAll('#parsed .chip').length") == 0
        assert page.problems() == []
