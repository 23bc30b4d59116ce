"""Scraping through real instaloader structures, recorded in instaloader's own JSON format.

Profiles are written with `instaloader.save_structure_to_file` from complete
nodes; the context they load into fails loudly on any network call.
"""

import json
import os
import stat
from datetime import datetime, timedelta, timezone

import instaloader
import pytest
import requests
from instaloader import exceptions as ig

from clipgram import demo, tables
from clipgram.sources import instagram, session

ACCOUNT = "shapes.daily"
OWNER = {"id": "777", "username": ACCOUNT}
START = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


def _node(i: int, *, typename="GraphImage", pinned=False, location=None, tagged=(), children=None):
    """A complete post node: every field instaloader reads, so nothing is fetched."""
    code = f"Post{i:03d}"
    node = {
        "__typename": typename, "id": str(5000 + i), "shortcode": code, "owner": dict(OWNER),
        "taken_at_timestamp": int((START + timedelta(days=i)).timestamp()),
        "display_url": f"https://cdn.example/{code}.jpg", "is_video": typename == "GraphVideo",
        "edge_media_to_caption": {"edges": [{"node": {"text": f"Day {i} #shape{i} #daily with @friend{i}"}}]},
        "edge_media_preview_like": {"count": 10 * i}, "edge_media_to_comment": {"count": i},
        "edge_media_to_tagged_user": {"edges": [{"node": {"user": {"username": u}}} for u in tagged]},
        "accessibility_caption": None, "location": location,
    }
    if pinned:
        node["pinned_for_users"] = [{"id": OWNER["id"]}]
    if typename == "GraphVideo":
        node["video_url"] = f"https://cdn.example/{code}.mp4"
        node["video_view_count"] = 99
    if children is not None:
        node["edge_sidecar_to_children"] = {"edges": [{"node": c} for c in children]}
    return node


def _carousel(i):
    code = f"Post{i:03d}"
    children = [{"__typename": "GraphImage", "id": f"{i}{j}", "shortcode": f"{code}c{j}", "is_video": False,
                 "display_url": f"https://cdn.example/{code}_{j}.jpg"} for j in range(2)]
    children.append({"__typename": "GraphVideo", "id": f"{i}2", "shortcode": f"{code}c2", "is_video": True,
                     "display_url": f"https://cdn.example/{code}_2.jpg",
                     "video_url": f"https://cdn.example/{code}_2.mp4"})
    return _node(i, typename="GraphSidecar", children=children)


def _record(directory, nodes, followers=1000):
    """Save a profile and its posts as `instaloader --metadata-json` would."""
    directory.mkdir(parents=True, exist_ok=True)
    context = instagram.offline_context()
    for node in nodes:
        post = instaloader.Post(context, node)
        instaloader.save_structure_to_file(post, str(directory / f"{post.date_utc:%Y-%m-%d_%H-%M-%S}_UTC.json"))
    profile = instaloader.Profile(context, {
        "id": OWNER["id"], "username": ACCOUNT, "full_name": "Shapes Daily", "biography": "one a day",
        "is_private": False, "edge_followed_by": {"count": followers}, "edge_follow": {"count": 5},
        "profile_pic_url_hd": "https://cdn.example/me.jpg"})
    instaloader.save_structure_to_file(profile, str(directory / f"{ACCOUNT}_{OWNER['id']}.json"))
    return directory


def _first_nodes():
    """Eight posts: a carousel (with a video item), a video, one with a location and tagged users."""
    nodes = [_node(i) for i in range(8)]
    nodes[1] = _node(1, location={"id": "1", "name": "Lisbon, Portugal", "slug": "lisbon"},
                     tagged=("Alice", "bob"))
    nodes[3] = _carousel(3)
    nodes[5] = _node(5, typename="GraphVideo")
    return nodes


@pytest.fixture
def first(tmp_path):
    return _record(tmp_path / "first", _first_nodes())


@pytest.fixture
def second(tmp_path):
    """An hour later: three new posts, post 2 deleted, post 1 pinned (listed first)."""
    nodes = [n for n in _first_nodes() if n["shortcode"] != "Post002"]
    nodes[1] = {**nodes[1], "pinned_for_users": [{"id": OWNER["id"]}]}
    nodes += [_node(i) for i in (8, 9, 10)]
    return _record(tmp_path / "second", nodes, followers=1010)


class Counted:
    """A post list that counts how far it was consumed, and can fail at a position."""

    def __init__(self, posts, fail_at=None, error=None):
        self.posts, self.fail_at, self.error, self.consumed = posts, fail_at, error, 0

    def __iter__(self):
        for i, post in enumerate(self.posts):
            if i == self.fail_at:
                raise self.error
            self.consumed += 1
            yield post


def _source(directory, **kw):
    recording = instagram.load_recorded(directory)
    return recording.profile, Counted(recording.posts, **kw)


def _codes(data_dir):
    return [r[0] for r in tables.connect(data_dir).execute(
        "SELECT shortcode FROM posts ORDER BY shortcode").fetchall()]


def _count(data_dir, table):
    return tables.connect(data_dir).execute(
        f"SELECT count(*), count(DISTINCT {'shortcode' if table == 'posts' else 'media_id'}) FROM {table}"
    ).fetchone()


def test_recorded_profile_loads_as_real_instaloader_objects(second):
    recording = instagram.load_recorded(second)
    profile, posts = recording.profile, recording.posts
    assert isinstance(profile, instaloader.Profile) and profile.username == ACCOUNT
    assert all(isinstance(p, instaloader.Post) for p in posts)
    assert posts[0].shortcode == "Post001" and posts[0].is_pinned   # pinned first, out of date order
    rest = [p.date_utc for p in posts[1:]]
    assert rest == sorted(rest, reverse=True)


def test_first_scrape_stores_everything_the_profile_holds(tmp_path, first):
    result = instagram.scrape(tmp_path, ACCOUNT, first)
    con = tables.connect(tmp_path)
    assert result.done == 8 and _count(tmp_path, "posts") == (8, 8)
    row = con.execute("SELECT caption, hashtags, mentions, tagged_users, location, likes, comments, "
                      "owner_id, owner_username, taken_at FROM posts WHERE shortcode = 'Post001'").fetchone()
    assert row == ("Day 1 #shape1 #daily with @friend1", ["shape1", "daily"], ["friend1"], ["alice", "bob"],
                   "Lisbon, Portugal", 10, 1, 777, ACCOUNT, START + timedelta(days=1))
    assert con.execute("SELECT location FROM posts WHERE shortcode = 'Post004'").fetchone() == (None,)

    carousel = con.execute("SELECT position, url, is_video, video_url FROM media WHERE shortcode = 'Post003' "
                           "ORDER BY position").fetchall()
    assert carousel == [(0, "https://cdn.example/Post003_0.jpg", False, None),
                        (1, "https://cdn.example/Post003_1.jpg", False, None),
                        (2, "https://cdn.example/Post003_2.jpg", True, "https://cdn.example/Post003_2.mp4")]
    assert con.execute("SELECT url, is_video, video_url, status FROM media WHERE shortcode = 'Post005'"
                       ).fetchall() == [("https://cdn.example/Post005.jpg", True,
                                         "https://cdn.example/Post005.mp4", "pending")]
    assert _count(tmp_path, "media") == (10, 10)

    profile = con.execute("SELECT profile_id, username, full_name, biography, followers, followees, "
                          "is_private, profile_pic_url, synced_through FROM profiles").fetchall()
    assert profile == [(777, ACCOUNT, "Shapes Daily", "one a day", 1000, 5, False,
                        "https://cdn.example/me.jpg", START + timedelta(days=7))]


def test_second_scrape_of_the_same_profile_writes_nothing(tmp_path, first):
    instagram.scrape(tmp_path, ACCOUNT, first)
    parts = sorted((tmp_path / "tables").rglob("*.parquet"))
    assert instagram.scrape(tmp_path, ACCOUNT, first).done == 0
    assert sorted((tmp_path / "tables").rglob("*.parquet")) == parts


def test_incremental_scrape_takes_only_new_posts_past_a_pinned_one_and_stops_paging(tmp_path, first, second):
    instagram.scrape(tmp_path, ACCOUNT, first)
    profile, posts = _source(second)
    result = instagram.scrape(tmp_path, ACCOUNT, source=(profile, posts))
    assert result.done == 3
    # pinned Post001, three new posts, then the first known post ends the walk
    assert posts.consumed == 5 < len(posts.posts)
    assert _codes(tmp_path) == [f"Post{i:03d}" for i in range(11)]  # Post002 deleted upstream, kept here
    assert _count(tmp_path, "posts") == (11, 11) and _count(tmp_path, "media") == (13, 13)
    con = tables.connect(tmp_path)
    assert con.execute("SELECT followers, synced_through FROM profiles").fetchone() == (
        1010, START + timedelta(days=10))


def test_since_and_limit_bound_the_first_run_and_later_runs_only_add_newer_posts(tmp_path, first, second):
    instagram.scrape(tmp_path, ACCOUNT, first, instagram.ScrapeSettings(limit=3))
    assert _codes(tmp_path) == ["Post005", "Post006", "Post007"]
    instagram.scrape(tmp_path, ACCOUNT, second)  # the bound holds: no backfill below Post005
    assert _codes(tmp_path) == ["Post005", "Post006", "Post007", "Post008", "Post009", "Post010"]

    other = tmp_path / "since"
    since = instagram.ScrapeSettings(since=START + timedelta(days=6))
    assert instagram.scrape(other, ACCOUNT, second, since).done == 5  # the pinned old post is not taken
    assert _codes(other) == ["Post006", "Post007", "Post008", "Post009", "Post010"]


def test_full_rewalk_fills_gaps_and_keeps_posts_gone_from_the_profile(tmp_path, first, second):
    instagram.scrape(tmp_path, ACCOUNT, first, instagram.ScrapeSettings(limit=3))
    result = instagram.scrape(tmp_path, ACCOUNT, second, instagram.ScrapeSettings(full=True))
    assert result.done == 7 - 1 + 1  # the 4 below the bound (Post002 is gone) + 3 new ones
    assert "Post002" not in _codes(tmp_path) and len(_codes(tmp_path)) == 10
    instagram.scrape(tmp_path / "b", ACCOUNT, first)
    again = instagram.scrape(tmp_path / "b", ACCOUNT, second, instagram.ScrapeSettings(full=True))
    assert again.done == 3 and "1 stored posts are no longer on the profile (kept)" in again.note
    assert "Post002" in _codes(tmp_path / "b")


def test_rate_limited_first_run_keeps_what_it_fetched_and_the_next_run_resumes(tmp_path, first):
    profile, posts = _source(first, fail_at=3, error=session.RateLimited(900))
    result = instagram.scrape(tmp_path, ACCOUNT, source=(profile, posts))
    assert result.done == 3 and "rate limited" in result.note
    assert _codes(tmp_path) == ["Post005", "Post006", "Post007"]
    assert tables.connect(tmp_path).execute("SELECT synced_through FROM profiles").fetchone() == (None,)
    assert instagram.scrape(tmp_path, ACCOUNT, first).done == 5
    assert _count(tmp_path, "posts") == (8, 8) and _count(tmp_path, "media") == (10, 10)


def test_rate_limited_incremental_run_leaves_no_gap(tmp_path, first, second):
    """Stopped after the newest new post: the next run must still fetch the two below it."""
    instagram.scrape(tmp_path, ACCOUNT, first)
    error = ig.TooManyRequestsException("429 Too Many Requests")
    profile, posts = _source(second, fail_at=2, error=error)  # pinned, Post010, then 429
    assert instagram.scrape(tmp_path, ACCOUNT, source=(profile, posts)).done == 1
    assert instagram.scrape(tmp_path, ACCOUNT, second).done == 2
    assert _count(tmp_path, "posts") == (11, 11)
    assert tables.connect(tmp_path).execute("SELECT synced_through FROM profiles").fetchone() == (
        START + timedelta(days=10),)


class TooManyRequests(requests.adapters.BaseAdapter):
    """Instagram answering 429 with its "Please wait a few minutes" body."""

    def send(self, request, **kwargs):
        response = requests.Response()
        response.status_code, response.url, response.request = 429, request.url, request
        response.headers["Content-Type"] = "application/json"
        response._content = b'{"message": "Please wait a few minutes before you try again.", "status": "fail"}'
        return response

    def close(self):
        pass


def test_rate_controller_ends_the_query_instead_of_sleeping_for_minutes():
    """instaloader's own 429 handling, with our controller: it raises rather than waits ~11 min."""
    context = instaloader.InstaloaderContext(
        sleep=False, quiet=True, max_connection_attempts=3,
        rate_controller=lambda c: session.EndingRateController(c, max_wait_s=60))
    context._session = requests.Session()
    context._session.mount("https://", TooManyRequests())
    with pytest.raises(session.RateLimited) as caught:
        context.get_json("graphql/query", {"query_hash": "abc", "variables": "{}"})
    assert caught.value.wait_s > 60
    controller = session.EndingRateController(context, max_wait_s=60)
    controller.sleep(0.01)  # short pacing waits still sleep


@pytest.mark.parametrize("error, says", [
    (ig.ProfileNotExistsException("Profile shapes.daily does not exist."), "does not exist on Instagram"),
    (ig.PrivateProfileNotFollowedException("Profile is private"), "is private"),
    (ig.LoginRequiredException("Redirected to login page. Use --login."), "clipgram login"),
    (instaloader.AbortDownloadException('400 Bad Request: {"message": "checkpoint_required"}'),
     "verify the account"),
    (ig.QueryReturnedBadRequestException("Please wait a few minutes before you try again."), "rate-limiting"),
    (ig.ConnectionException("JSON Query to graphql/query: 502 Bad Gateway"), "502 Bad Gateway"),
])
def test_scrape_errors_end_with_one_line_saying_what_to_do_and_keep_what_was_fetched(tmp_path, first, error, says):
    profile, posts = _source(first, fail_at=2, error=error)
    if isinstance(error, (ig.QueryReturnedBadRequestException,)):  # a rate limit: a clean end
        assert instagram.scrape(tmp_path, ACCOUNT, source=(profile, posts)).done == 2
        message = session.explain(error, ACCOUNT, "").args[0]
    else:
        with pytest.raises(session.ScrapeError) as caught:
            instagram.scrape(tmp_path, ACCOUNT, source=(profile, posts))
        message = caught.value.args[0]
    assert says in message and "\n" not in message
    assert _codes(tmp_path) == ["Post006", "Post007"]  # fetched before the error: kept


def test_a_profile_error_before_any_post_writes_nothing(tmp_path, monkeypatch):
    def missing(account, settings):
        raise ig.ProfileNotExistsException(f"Profile {account} does not exist.")
    monkeypatch.setattr(instagram, "live_source", missing)  # Instagram itself cannot exist here
    with pytest.raises(session.ScrapeError, match="'nobody.here' does not exist on Instagram"):
        instagram.scrape(tmp_path, "nobody.here")
    assert not (tmp_path / "tables").exists() or not list((tmp_path / "tables").rglob("*.parquet"))


def test_one_scraper_per_session(tmp_path, first):
    with session.session_lock(tmp_path / "state" / "locks", "me"):
        busy = instagram.scrape(tmp_path, ACCOUNT, settings=instagram.ScrapeSettings(session_user="me"),
                                source=_source(first))
        assert busy.done == 0 and "another clipgram scrape is using the me session" in busy.note
        assert instagram.scrape(tmp_path, ACCOUNT, source=_source(first)).done == 8  # another session is free
        assert instagram.scrape(tmp_path / "b", ACCOUNT, first,  # a recording needs no session
                                instagram.ScrapeSettings(session_user="me")).done == 8
    assert _count(tmp_path, "posts") == (8, 8)


def test_a_field_the_recording_lacks_is_null_not_a_request(tmp_path, recorded):
    path = next(recorded.glob("*_UTC.json"))
    data = json.loads(path.read_text())
    del data["node"]["edge_media_preview_like"]  # Post.likes would fetch the full metadata for it
    path.write_text(json.dumps(data))
    posts = len(list(recorded.glob("*_UTC.json")))
    assert instagram.scrape(tmp_path, demo.ACCOUNT, recorded).done == posts  # the context refuses the network
    con = tables.connect(tmp_path)
    assert con.execute("SELECT likes FROM posts WHERE shortcode = ?",
                       [data["node"]["shortcode"]]).fetchone() == (None,)
    assert con.execute("SELECT count(*) FROM posts WHERE likes IS NOT NULL").fetchone() == (posts - 1,)


class FakeInstagramLogin:
    """Stands in for Instagram's login endpoint only: sets the cookie a real login sets."""

    def __init__(self, two_factor=False, password="hunter2-secret"):
        self.two_factor, self.password, self.codes = two_factor, password, []

    def __call__(self, loader):
        def login(user, passwd):
            if passwd != self.password:
                raise ig.BadCredentialsException("Login error: Wrong password.")
            if self.two_factor:
                raise ig.TwoFactorAuthRequiredException("Login error: two-factor authentication required.")
            self._logged_in(user)

        def two_factor_login(code):
            self.codes.append(code)
            self._logged_in(loader.context.username or "me")

        self.loader = loader
        loader.context.login = login
        loader.context.two_factor_login = two_factor_login
        return loader

    def _logged_in(self, user):
        self.loader.context._session.cookies.set("sessionid", "abc123", domain=".instagram.com")
        self.loader.context.username = user


@pytest.mark.parametrize("two_factor", [False, True])
def test_login_saves_a_private_session_file_without_the_password(tmp_path, two_factor, caplog):
    fake = FakeInstagramLogin(two_factor)
    loader = fake(instaloader.Instaloader(quiet=True))
    path = session.login("me", str(tmp_path / "sessions"), ask_password=lambda _: "hunter2-secret",
                         ask_code=lambda _: " 123456 ", loader=loader)
    assert path == tmp_path / "sessions" / "session-me"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert b"hunter2-secret" not in path.read_bytes() and "hunter2-secret" not in caplog.text
    assert fake.codes == (["123456"] if two_factor else [])
    again = session.loader_for("me", str(tmp_path / "sessions"), max_wait_s=60)
    assert again.context.is_logged_in and again.context.username == "me"
    assert again.context._session.cookies.get("sessionid") == "abc123"


def test_wrong_password_and_missing_session_say_what_to_do(tmp_path):
    loader = FakeInstagramLogin()(instaloader.Instaloader(quiet=True))
    with pytest.raises(session.ScrapeError, match=r"wrong password.*clipgram login me"):
        session.login("me", str(tmp_path), ask_password=lambda _: "nope", loader=loader)
    assert not (tmp_path / "session-me").exists()
    with pytest.raises(session.ScrapeError, match=r"no Instagram session for me.*clipgram login me"):
        session.loader_for("me", str(tmp_path), max_wait_s=60)
