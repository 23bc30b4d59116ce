"""What a live scrape costs in requests, counted under instaloader's real Profile and Post code.

Instagram cannot be reached here, so a recording transport (in place of requests' HTTP
adapter, which every instaloader session uses) answers with responses that other people
recorded from Instagram (tests/SAMPLES.md): a `web_profile_info` user for the profile's
metadata query (the same `{"data": {"user": …}}` envelope) and three consecutive pages of
a logged-in profile timeline. Anything else it is asked is counted and refused.
"""

import json
from urllib.parse import parse_qs

import pytest
import requests
from instaloader import Instaloader, Profile
from realdata import SAMPLES

from clipgram import tables
from clipgram.sources import instagram

PAGES = SAMPLES / "instagram_pages" / "crawlinsta_anasaiaofficial_2024"
pytestmark = pytest.mark.skipif(not PAGES.is_dir(), reason=f"recorded pages absent at {PAGES}")
TIMELINE = "xdt_api__v1__feed__user_timeline_graphql_connection"


class Recording(requests.adapters.BaseAdapter):
    def __init__(self):
        self.profile = json.loads((PAGES / "web_profile_info.json").read_text())
        self.pages = [json.loads((PAGES / f"graphql{i}.json").read_text()) for i in (1, 2, 3)]
        self.sent: list[str] = []
        self.refused: list[str] = []

    def _page(self, variables: dict) -> dict | None:
        if TIMELINE not in json.dumps(variables) and "username" not in variables:
            return None
        after = variables.get("after")
        if after is None:
            return self.pages[0]
        for page, following in zip(self.pages, self.pages[1:]):
            if page["data"][TIMELINE]["page_info"]["end_cursor"] == after:
                return following
        return None

    def send(self, request, **kwargs):
        self.sent.append(f"{request.method} {request.url.split('?')[0]}")
        form = parse_qs(request.body if isinstance(request.body, str) else (request.body or b"").decode())
        variables = json.loads(form.get("variables", ["{}"])[0])
        body = None
        if request.url.endswith("/graphql/query") and "render_surface" in variables:
            body = self.profile  # the profile's metadata query
        elif request.url.endswith("/api/graphql"):
            body = self._page(variables)
        response = requests.Response()
        response.request, response.url = request, request.url
        if body is None:
            self.refused.append(self.sent[-1])
            response.status_code, response._content = 404, b"{}"
        else:
            response.status_code, response._content = 200, json.dumps(body).encode()
        response.headers["Content-Type"] = "application/json"
        return response

    def close(self):
        pass


@pytest.fixture
def transport(monkeypatch):
    recording = Recording()
    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", lambda self, request, **kw: recording.send(request))
    return recording


def _logged_in_profile(transport) -> Profile:
    """The recorded profile on a logged-in context, as `instaloader --login` leaves one."""
    loader = Instaloader(quiet=True, sleep=False)
    context = loader.context
    context.username = "viewer"
    context._session.cookies.update({"sessionid": "s", "csrftoken": "c", "ds_user_id": "1"})
    # the web app's page tokens, which instaloader reads once per session from the start page
    context._web_api_tokens_cache["s"] = {"lsd": "l", "fb_dtsg": "d", "av": "1"}
    return Profile(context, transport.profile["data"]["user"])


def test_new_posts_cost_the_profile_query_and_one_request_per_page(tmp_path, transport):
    profile = _logged_in_profile(transport)
    posts_on_two_pages = sum(len(p["data"][TIMELINE]["edges"]) for p in transport.pages[:2])
    result = instagram.scrape(tmp_path, "anasaiaofficial", settings=instagram.ScrapeSettings(
        limit=posts_on_two_pages + 3), source=(profile, instagram.live_posts(profile)))
    assert result.done == posts_on_two_pages + 3
    assert transport.refused == []
    assert len(transport.sent) == 1 + 3  # the profile's metadata, then three timeline pages
    con = tables.connect(tmp_path)
    nodes = [e["node"] for p in transport.pages for e in p["data"][TIMELINE]["edges"]][:result.done]
    rows = dict(con.execute("SELECT shortcode, comments FROM posts").fetchall())
    assert rows == {n["code"]: n["comment_count"] for n in nodes}  # counts read from the pages
    items = sum(len(n.get("carousel_media") or []) or 1 for n in nodes)
    assert con.execute("SELECT count(*) FROM media").fetchone() == (items,)


def test_an_incremental_run_costs_the_profile_query_and_the_first_page(tmp_path, transport):
    first = _logged_in_profile(transport)
    instagram.scrape(tmp_path, "anasaiaofficial", settings=instagram.ScrapeSettings(limit=5),
                     source=(first, instagram.live_posts(first)))
    transport.sent.clear()
    again = _logged_in_profile(transport)
    assert instagram.scrape(tmp_path, "anasaiaofficial",
                            source=(again, instagram.live_posts(again))).done == 0
    assert len(transport.sent) == 1 + 1 and transport.refused == []
