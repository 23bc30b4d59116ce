"""`clipgram app` over real HTTP on 127.0.0.1: a uvicorn server on the ingested sample library."""

import io
import os
import shutil
from contextlib import contextmanager

import httpx
import pytest
from PIL import Image

from clipgram import catalog, demo, synthetic
from clipgram.app import library, server, sql, thumbs

RESULT_FIELDS = {"media_id", "score", "match", "account", "shortcode", "caption", "post_caption", "thumbnail",
                 "permalink"}


@contextmanager
def client(lib: library.Library, token: str | None = None):
    with server.running(lib, token) as url, httpx.Client(base_url=url, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def data_dir(app_library, tmp_path_factory):
    """A copy of the app's library: this module replaces its catalog and plants files."""
    data = tmp_path_factory.mktemp("app") / "data"
    shutil.copytree(app_library, data)
    return data


@pytest.fixture(scope="module")
def lib(data_dir, ingested_sample):
    return library.Library(data_dir, ingested_sample.models)


@pytest.fixture(scope="module")
def app(lib):
    with client(lib) as http:
        yield http


def _tables(data_dir):
    return {p: p.stat().st_mtime_ns for p in (data_dir / "tables").rglob("*") if p.is_file()}


def test_text_search_returns_documented_results_with_thumbnails(app, data_dir):
    body = app.get("/api/search", params={"q": "a red square", "k": 5}).json()
    assert body["mode"] == "hybrid" and 0 < len(body["results"]) <= 5
    assert all(RESULT_FIELDS <= set(r) for r in body["results"])
    # the results judged to match first (relevance.py), each group best first
    matches, flags = body["matches"], [r["match"] for r in body["results"]]
    assert 0 < matches <= len(flags) and flags == [True] * matches + [False] * (len(flags) - matches)
    for group in (body["results"][:matches], body["results"][matches:]):
        assert [r["score"] for r in group] == sorted((r["score"] for r in group), reverse=True)
    thumb = app.get(body["results"][0]["thumbnail"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(thumb.content))
    assert max(img.size) <= thumbs.SIDE  # a grid never loads the 320-px originals' bigger kin
    sha = body["results"][0]["sha256"]
    assert (data_dir / thumbs.FOLDER / sha[:2] / f"{sha}.jpg").read_bytes() == thumb.content  # cached


def test_paging_and_filters(app):
    first = app.get("/api/search", params={"q": "a shape", "k": 4, "mode": "clip"}).json()["results"]
    second = app.get("/api/search", params={"q": "a shape", "k": 4, "mode": "clip", "page": 1}).json()["results"]
    assert len(first) == len(second) == 4 and not {r["media_id"] for r in first} & {r["media_id"] for r in second}
    liked = app.get("/api/search", params={"q": "a shape", "k": 50, "min_likes": 500}).json()["results"]
    assert liked and all(r["likes"] >= 500 for r in liked)
    tagged = app.get("/api/search", params={"q": "a shape", "k": 50, "hashtag": "circle"}).json()["results"]
    assert tagged and all("#circle" in r["post_caption"] for r in tagged)


def test_more_like_this_and_the_image_page(app):
    some = app.get("/api/search", params={"q": "a blue circle", "k": 1, "mode": "clip"}).json()["results"][0]
    similar = app.get(f"/api/similar/{some['media_id']}", params={"k": 5}).json()["results"]
    assert len(similar) == 5 and some["media_id"] not in {r["media_id"] for r in similar}
    page = app.get(f"/api/image/{some['media_id']}").json()
    assert page["image"]["media_id"] == some["media_id"] and page["image"]["width"] > 0
    assert [r["media_id"] for r in page["similar"][:5]] == [r["media_id"] for r in similar]
    original = app.get(f"/media/{some['sha256']}")
    assert original.status_code == 200 and original.headers["content-type"] == "image/jpeg"


def test_search_by_an_uploaded_image(app):
    scene = synthetic.Scene("triangle", "green", "white")
    buf = io.BytesIO()
    synthetic.render(scene, 224).save(buf, "PNG")
    body = app.post("/api/search/image", content=buf.getvalue(), headers={"content-type": "image/png"})
    assert body.status_code == 200 and len(body.json()["results"]) == 24
    bad = app.post("/api/search/image", content=b"<html>login</html>", headers={"content-type": "image/png"})
    assert bad.status_code == 400 and "HTML page" in bad.json()["error"]
    big = app.post("/api/search/image", content=b"\xff" * (server.MAX_UPLOAD + 1))
    assert big.status_code == 413 and "MB" in big.json()["error"]


def test_explore_endpoints(app):
    state = app.get("/api/status").json()
    assert {(r["account"], r["stage"]) for r in state["stages"]} >= {(demo.ACCOUNT, "embed")}
    clusters = app.get("/api/clusters").json()["clusters"]
    assert len(clusters) == 3 and all(c["samples"] and c["name"] for c in clusters)
    members = app.get(f"/api/clusters/{clusters[0]['cluster']}").json()["results"]
    assert len(members) == clusters[0]["images"]
    points = app.get("/api/map").json()["points"]
    assert len(points) == len({p["sha256"] for p in points}) > 20
    assert {"groups"} <= set(app.get("/api/duplicates").json())
    schema = app.get("/openapi.json").json()
    assert {"/api/search", "/api/similar/{media_id}", "/api/search/image", "/api/status", "/api/clusters",
            "/api/map", "/thumb/{sha256}"} <= set(schema["paths"])
    for page in ("/", "/explore", "/map", f"/image/{points[0]['media_id']}"):
        assert "<script src=\"/static/app.js\">" in app.get(page).text


def test_errors_are_json_that_say_what_to_do(app):
    bad_mode = app.get("/api/search", params={"q": "x", "mode": "sql"})
    assert bad_mode.status_code == 422 and "mode" in bad_mode.json()["error"]
    missing = app.get("/api/similar/nope_0")
    assert missing.status_code == 400 and "no embedded image" in missing.json()["error"]
    assert app.get("/api/image/nope_0").status_code == 404


@pytest.mark.parametrize("path", [
    "/thumb/..%2F..%2Fcatalog.duckdb", "/thumb/%2Fetc%2Fpasswd", "/thumb/../catalog.duckdb",
    "/media/..%2Fcatalog.duckdb", "/thumb/" + "A" * 64, "/media/" + "0" * 64, "/static/..%2F..%2Fcli.py",
])
def test_nothing_in_a_request_becomes_a_path(app, path):
    response = app.get(path)
    assert response.status_code == 404 and b"SQLite" not in response.content and b"root:" not in response.content


def test_a_planted_symlink_is_not_followed_and_a_file_name_query_is_text(app, data_dir, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve")
    some = app.get("/api/search", params={"q": "a shape", "k": 30, "mode": "clip"}).json()["results"][-1]
    planted = data_dir / thumbs.FOLDER / some["sha256"][:2] / f"{some['sha256']}.jpg"
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.unlink(missing_ok=True)
    planted.symlink_to(secret)
    served = app.get(some["thumbnail"])
    assert served.status_code == 200 and b"do not serve" not in served.content
    assert served.headers["content-type"] == "image/jpeg"
    # a term that names a file is text here: nothing is read from the server's disk
    assert app.get("/api/search", params={"q": f"{secret.with_suffix('.jpg')}", "k": 1}).status_code == 200


def test_the_app_picks_up_a_new_catalog_and_writes_no_table(app, lib, data_dir):
    before = _tables(data_dir)
    first = lib.generation()
    assert app.get("/api/search", params={"q": "a red circle", "k": 3}).status_code == 200
    fresh = data_dir / "catalog.new"
    shutil.copyfile(data_dir / catalog.CATALOG, fresh)
    os.replace(fresh, data_dir / catalog.CATALOG)  # what publish does
    assert app.get("/api/search", params={"q": "a red circle", "k": 3}).status_code == 200
    assert lib.generation() is not first
    assert _tables(data_dir) == before


def test_another_interface_needs_the_token(lib):
    assert not server.is_loopback("0.0.0.0") and server.is_loopback("127.0.0.1")
    token = server.new_token()
    with client(lib, token) as http:
        refused = http.get("/api/status")
        assert refused.status_code == 401 and "token" in refused.json()["error"]
        assert http.get("/thumb/" + "0" * 64).status_code == 401  # every request, media too
        assert http.get("/api/status", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert http.get("/", params={"token": token}).status_code == 200  # the printed link
        assert http.get("/api/status").status_code == 200  # then its cookie
        http.cookies.clear()
        assert http.get("/api/status", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_sql_is_off_unless_allowed(app):
    refused = app.post("/api/sql", json={"sql": "SELECT 1"})
    assert refused.status_code == 403 and "--allow-sql" in refused.json()["error"]


@pytest.fixture(scope="module")
def sql_app(data_dir, ingested_sample):
    lib = library.Library(data_dir, ingested_sample.models, sql.Limits(rows=5, timeout_s=1.0))
    with client(lib) as http:
        yield http


def _sql(http, statement: str):
    return http.post("/api/sql", json={"sql": statement})


def test_sql_reads_the_library_within_its_row_limit(sql_app, data_dir):
    con = catalog.connect(data_dir)
    images = con.execute("SELECT count(*) FROM images").fetchone()[0]
    counted = _sql(sql_app, "SELECT count(*) AS n FROM images").json()
    assert counted["columns"] == ["n"] and counted["rows"] == [[images]] and not counted["truncated"]
    capped = _sql(sql_app, "SELECT media_id, taken_at, embedding FROM images JOIN embeddings USING (sha256)").json()
    assert len(capped["rows"]) == 5 and capped["truncated"] and images > 5
    assert isinstance(capped["rows"][0][1], str) and len(capped["rows"][0][2]) == int(catalog.meta(con)["clip_dim"])
    # the CLIP functions and the catalog's macros, as in `clipgram sql`
    by_sql = _sql(sql_app, "SELECT media_id FROM search_text('a red circle', 3)").json()["rows"]
    by_api = sql_app.get("/api/search", params={"q": "a red circle", "k": 3, "mode": "clip"}).json()["results"]
    assert [r[0] for r in by_sql] == [r["media_id"] for r in by_api]
    assert _sql(sql_app, "SELECT count(*) FROM search_captions('circle', 3)").json()["rows"][0][0] > 0


@pytest.mark.parametrize("statement, says", [
    ("COPY (SELECT 1) TO 'planted.csv'", "only SELECT"),
    ("COPY images TO 'tables/planted.parquet'", "only SELECT"),
    ("ATTACH 'other.duckdb' AS other", "only SELECT"),
    ("INSTALL httpfs", "only SELECT"),
    ("LOAD fts", "only SELECT"),
    ("SET enable_external_access = true", "only SELECT"),
    ("CREATE TABLE planted AS SELECT 1", "only SELECT"),
    ("SELECT 1; SELECT 2", "one statement"),
    ("SELECT * FROM read_text('/etc/passwd')", "failed"),
    ("SELECT * FROM read_csv('../secret.csv')", "failed"),
    ("SELECT * FROM read_text('tables/../../secret.csv')", "failed"),
    ("SELECT * FROM glob('/*')", "failed"),
    ("SELEC 1", "failed"),
])
def test_sql_refuses_what_is_not_a_read_of_the_library(sql_app, data_dir, statement, says):
    (data_dir.parent / "secret.csv").write_text("a\nsecret\n")
    before = _tables(data_dir)
    refused = _sql(sql_app, statement)
    assert refused.status_code == 400 and says in refused.json()["error"]
    assert _tables(data_dir) == before and not list(data_dir.glob("planted*"))
    assert _sql(sql_app, "SELECT 1 AS one").json()["rows"] == [[1]]  # and it still serves


def test_a_long_statement_is_stopped(sql_app):
    slow = _sql(sql_app, "SELECT sum(hash(i)) FROM range(100000000000) t(i)")
    assert slow.status_code == 400 and "ran past 1 s" in slow.json()["error"]
    assert _sql(sql_app, "SELECT 2 AS two").json()["rows"] == [[2]]


def test_explore_pages_without_analyses_say_why_and_the_command_that_fills_them(ingested_sample, tmp_path):
    """A library whose analyses are gone: each Explore API names a command; run as printed, it
    fills them."""
    import shlex

    from clipgram.analysis import derived, fits
    from clipgram.cli import main
    from clipgram.stages import publish

    data = tmp_path / "data"
    shutil.copytree(ingested_sample.data_dir, data)
    for name in [t.name for t in derived.ALL_DERIVED] + [fits.FITS_DIR]:
        shutil.rmtree(data / "tables" / name, ignore_errors=True)
    publish.republish(data)
    lib = library.Library(data, ingested_sample.models)
    with client(lib) as http:
        hints = {path: http.get(path).json()["hint"] for path in ("/api/clusters", "/api/map", "/api/duplicates")}
    assert all(h and "analyse stage" in h for h in hints.values()), hints
    commands = {h.split(": ", 1)[1].rsplit("now: ", 1)[-1] for h in hints.values()}
    assert len(commands) == 1
    argv = shlex.split(commands.pop())
    assert argv[:2] == ["clipgram", "analyse"] and "_all_accounts" not in " ".join(hints.values())
    assert main([*argv[1:], "--clip-model", "tiny", "--captioner", "tiny", "--device", "cpu"]) == 0
    lib = library.Library(data, ingested_sample.models)
    with client(lib) as http:
        assert http.get("/api/clusters").json()["clusters"] and http.get("/api/map").json()["points"]
        assert http.get("/api/duplicates").json()["groups"]  # the demo's repost


def test_search_reads_filters_from_the_query_unless_literal(app, lib):
    body = app.get("/api/search", params={"q": "a red shape #square", "k": 50}).json()
    assert body["parsed"] == {"text": "a red shape", "since": None, "until": None, "accounts": [],
                              "hashtags": ["square"], "min_likes": None}
    tagged = {m for m, in lib.cursor().execute(
        "SELECT media_id FROM images WHERE list_contains(hashtags, 'square')").fetchall()}
    assert body["results"] and {r["media_id"] for r in body["results"]} <= tagged
    literal = app.get("/api/search", params={"q": "a red shape #square", "k": 50, "literal": "true"}).json()
    assert literal["parsed"]["hashtags"] == [] and len(literal["results"]) > len(body["results"])
