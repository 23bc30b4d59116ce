"""The app's HTTP surface: the page, the JSON API it uses, thumbnails, and the token check.

Every handler reads through a per-request cursor on the newest published catalog; none
writes a table. Media leave only by content address (/thumb/{sha256}). Errors are JSON,
`{"error": "…what to do…"}`.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
from fastapi import FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field

from clipgram import catalog, doctor, images, query, search, status
from clipgram.analysis import fits
from clipgram.analysis.derived import ALL_ACCOUNTS, scope_label
from clipgram.app import thumbs
from clipgram.app.library import Library
from clipgram.errors import ClipgramError

STATIC = Path(__file__).parent / "static"
PAGES = ("/", "/explore", "/map", "/image/{media_id}")  # one page; its script shows the view
MAX_UPLOAD = 20 * 1024 * 1024
MAX_K = 200
TOKEN_COOKIE = "clipgram_token"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(24)


class SqlRequest(BaseModel):
    sql: str = Field(..., description="one SELECT or EXPLAIN statement over the catalog's views",
                     examples=["SELECT account, count(*) FROM images GROUP BY account"])


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _result(row: dict[str, Any], score: float, match: bool | None = None) -> dict[str, Any]:
    return {"media_id": row["media_id"], "score": round(score, 6), "match": match, "account": row["account"],
            "shortcode": row["shortcode"], "caption": row["generated_caption"],
            "post_caption": row["post_caption"], "likes": row["likes"],
            "taken_at": row["taken_at"].isoformat() if row["taken_at"] else None,
            "sha256": row["sha256"], "thumbnail": f"/thumb/{row['sha256']}",
            "permalink": row["permalink"]}


_COLUMNS = ("media_id", "account", "shortcode", "sha256", "generated_caption", "post_caption",
            "likes", "taken_at", "permalink")


def _rows(con, media_ids: list[str]) -> dict[str, dict[str, Any]]:
    if not media_ids:
        return {}
    found = con.execute(f"SELECT {', '.join(_COLUMNS)} FROM images WHERE media_id IN {search.one_of(media_ids)}"
                        ).fetchall()
    return {r[0]: dict(zip(_COLUMNS, r)) for r in found}


def _results(con, hits: list[search.Hit]) -> list[dict[str, Any]]:
    rows = _rows(con, [h.media_id for h in hits])
    return [_result(rows[h.media_id], h.score, h.match) for h in hits]


def _filters(account: list[str], since: date | None, until: date | None, hashtag: list[str],
             min_likes: int | None, label: list[str], text: str | None = None) -> search.Filters:
    return search.Filters(accounts=account, since=since, until=until, hashtags=hashtag,
                          min_likes=min_likes, labels=[search.parse_label_filter(t) for t in label],
                          has_text=None if not text else text == "with")


def command(library: Library, *args: str) -> str:
    """A clipgram command line that acts on this library, as a person would type it here."""
    from clipgram.cli import next_steps

    return next_steps(library.data_dir, [args])[0]


def _not_analysed(library: Library, what: str) -> str:
    return (f"no {what} yet: the analyse stage computes it at the end of every ingest, once 3 images "
            f"or more are embedded. To compute it now: {command(library, 'analyse')}")


def _no_duplicates(library: Library, scope: str) -> str:
    meta = catalog.meta(library.cursor())
    fit = fits.load(library.data_dir, "duplicates", scope, meta.get("clip_model") or "")
    if fit is None:
        return _not_analysed(library, "duplicate groups")
    return (f"no duplicates: no two of the {fit.meta['images']} images are the same file or as close "
            f"as cosine {fit.meta['threshold']} (a lower threshold: "
            f"{command(library, 'duplicates', '--threshold', '0.9')})")


def create_app(library: Library, token: str | None = None) -> FastAPI:
    """The app over `library`; with a `token`, every request must carry it."""
    app = FastAPI(title="clipgram", summary="Search and explore an image library",
                  docs_url="/docs", redoc_url=None)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, e: HTTPError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=e.status)

    @app.exception_handler(ClipgramError)
    async def _clipgram_error(request: Request, e: ClipgramError) -> JSONResponse:
        missing = isinstance(e, catalog.CatalogMissing)
        return JSONResponse({"error": str(e)}, status_code=503 if missing else 400)

    @app.exception_handler(duckdb.Error)
    @app.exception_handler(pa.ArrowException)
    async def _unreadable_table_file(request: Request, e: Exception) -> JSONResponse:
        found = doctor.unreadable(e)
        if found is None:
            raise e  # a bug: the server's own 500, with its traceback in the log
        return JSONResponse({"error": str(found)}, status_code=503)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        return JSONResponse({"error": f"bad request: {problems}"}, status_code=422)

    if token:
        @app.middleware("http")
        async def _check_token(request: Request, call_next):
            given = (request.headers.get("authorization", "").removeprefix("Bearer ").strip()
                     or request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE) or "")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"error": "this server needs its token: open the address it "
                                              "printed (…?token=…) or send 'Authorization: Bearer TOKEN'"},
                                    status_code=401)
            response = await call_next(request)
            if request.query_params.get("token"):  # the printed link: later requests use the cookie
                response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return response

    page = (STATIC / "index.html").read_text()
    for path in PAGES:
        app.add_api_route(path, lambda: HTMLResponse(page), include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def run_search(terms: list[search.Term], k: int, page: int, mode: str,
                   filters: search.Filters) -> dict[str, Any]:
        generation = library.generation()
        con = library.cursor(generation)
        encoder = None if mode == "captions" else library.encoder()
        ran, hits = search.search(con, library.data_dir, terms, k * (page + 1), mode, filters, encoder,
                                  generation.text)
        shown = hits[k * page:]
        # matches: how many leading results are judged to match (relevance.py); null: not judged
        return {"mode": ran, "page": page, "k": k, "matches": search.matches(shown),
                "results": _results(con, shown)}

    @app.get("/api/search", summary="Search by text: what `clipgram search` takes")
    def api_search(q: str = Query(..., description='text, "quoted" terms, weights (2:…), + and -'),
                   k: int = Query(24, ge=1, le=MAX_K), page: int = Query(0, ge=0, le=50),
                   mode: str = Query("auto", pattern="^(auto|hybrid|clip|captions)$"),
                   account: list[str] = Query([]), since: date | None = None, until: date | None = None,
                   hashtag: list[str] = Query([]), min_likes: int | None = Query(None, ge=0),
                   label: list[str] = Query([], description="SET=LABEL"),
                   text: str | None = Query(None, pattern="^(with|without)$",
                                            description="images with text in them (read by OCR), or without"),
                   literal: bool = Query(False, description="search the text as typed: read no dates, "
                                                            "@accounts, #hashtags or likes from it")
                   ) -> dict[str, Any]:
        parsed, filters = query.read(q, _filters(account, since, until, hashtag, min_likes, label, text),
                                     date.today(), literal)
        # files=False: a term that looks like a file name is text here, never a path to read
        terms = search.parse_query(parsed.text, files=False)
        return {**run_search(terms, k, page, mode, filters), "parsed": parsed.as_dict()}

    @app.get("/api/similar/{media_id}", summary="Images most like a stored one")
    def api_similar(media_id: str, k: int = Query(24, ge=1, le=MAX_K), page: int = Query(0, ge=0, le=50),
                    account: list[str] = Query([])) -> dict[str, Any]:
        return run_search([search.Term("like", media_id)], k, page, "clip",
                          _filters(account, None, None, [], None, []))

    @app.post("/api/search/image", summary="Search by an uploaded image (the request body)",
              openapi_extra={"requestBody": {"content": {"image/*": {"schema": {"type": "string",
                                                                                  "format": "binary"}}}}})
    async def api_search_image(request: Request, k: int = Query(24, ge=1, le=MAX_K)) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="clipgram-upload-") as tmp:
            path = Path(tmp) / "upload"
            size = 0
            with open(path, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > MAX_UPLOAD:
                        raise HTTPError(413, f"the image is over {MAX_UPLOAD >> 20} MB: send a smaller one")
                    f.write(chunk)
            if size == 0:
                raise HTTPError(400, "send the image as the request body (Content-Type: image/jpeg, …)")
            try:
                images.verify(path)  # the checks ingestion makes: kind, size, pixel bomb
            except images.BadImage as e:
                raise HTTPError(400, f"not an image this app can read: {e}") from None
            return run_search([search.Term("image", str(path))], k, 0, "clip", search.Filters())

    @app.get("/api/image/{media_id}", summary="Everything known about one image, and its neighbours")
    def api_image(media_id: str, k: int = Query(12, ge=1, le=MAX_K)) -> dict[str, Any]:
        con = library.cursor()
        row = con.execute("SELECT * FROM images WHERE media_id = ?", [media_id]).fetchone()
        if row is None:
            raise HTTPError(404, f"no image with media id {media_id!r}: search for it first")
        info = dict(zip([d[0] for d in con.description], row))
        labels = con.execute("SELECT label_set, label, round(score, 4) FROM labels "
                             "WHERE sha256 = ? AND rank = 1 ORDER BY label_set", [info["sha256"]]).fetchall()
        try:
            similar = run_search([search.Term("like", media_id)], k, 0, "clip", search.Filters())["results"]
        except search.SearchError:  # not embedded (a failed image, or a captions-only library)
            similar = []
        return {"image": {**_result(info, 1.0), "width": info["width"], "height": info["height"],
                          "hashtags": info["hashtags"], "mentions": info["mentions"],
                          "comments": info["comments"], "is_video": info["is_video"],
                          "accessibility_caption": info["accessibility_caption"],
                          "ocr_text": info["ocr_text"],
                          "labels": [{"set": s, "label": lab, "score": sc} for s, lab, sc in labels]},
                "similar": similar}

    @app.get("/api/status", summary="Per account and stage: done, pending, failed; the failed items")
    def api_status(failed: int = Query(100, ge=0, le=1000)) -> dict[str, Any]:
        meta = catalog.meta(library.cursor())
        rows = status.rows(library.data_dir, meta.get("clip_model"), meta.get("captioner"), meta.get("ocr"))
        con = library.cursor()
        items = con.execute("SELECT account, media_id, url, error FROM media WHERE status = 'failed' "
                            "ORDER BY account, media_id LIMIT ?", [failed]).fetchall()
        return {"stages": [{c: _plain(r[c]) for c in status.COLUMNS} for r in rows],
                "failed": [dict(zip(("account", "media_id", "url", "error"), i)) for i in items]}

    @app.get("/api/clusters", summary="Clusters, named, with sample thumbnails")
    def api_clusters(scope: str = ALL_ACCOUNTS, samples: int = Query(8, ge=1, le=48)) -> dict[str, Any]:
        con = library.cursor()
        found = con.execute("""
            SELECT cluster, any_value(cluster_name) AS name, count(*) AS images,
                   list(sha256 ORDER BY similarity DESC)[1:?] AS samples
            FROM clusters WHERE scope = ? GROUP BY cluster ORDER BY images DESC, cluster""",
                            [samples, scope]).fetchall()
        return {"scope": scope, "scope_label": scope_label(scope),
                "clusters": [{"scope": scope, "scope_label": scope_label(scope), "cluster": c, "name": n,
                              "images": i, "samples": [f"/thumb/{h}" for h in sample]}
                             for c, n, i, sample in found],
                "hint": None if found else _not_analysed(library, "clusters")}

    @app.get("/api/clusters/{cluster}", summary="The images of one cluster")
    def api_cluster(cluster: int, scope: str = ALL_ACCOUNTS, k: int = Query(96, ge=1, le=1000)) -> dict[str, Any]:
        con = library.cursor()
        ranked = con.execute("""
            SELECT i.media_id, c.similarity FROM clusters c JOIN images i USING (sha256)
            WHERE c.scope = ? AND c.cluster = ? QUALIFY row_number() OVER (PARTITION BY c.sha256) = 1
            ORDER BY c.similarity DESC, i.media_id LIMIT ?""", [scope, cluster, k]).fetchall()
        rows = _rows(con, [m for m, _ in ranked])
        name = con.execute("SELECT any_value(cluster_name) FROM clusters WHERE scope = ? AND cluster = ?",
                           [scope, cluster]).fetchone()[0]
        return {"name": name, "results": [_result(rows[m], s) for m, s in ranked]}

    @app.get("/api/map/region", summary="The images whose map points lie in a box (map coordinates)")
    def api_map_region(x0: float, y0: float, x1: float, y1: float, scope: str = ALL_ACCOUNTS,
                       k: int = Query(96, ge=1, le=1000)) -> dict[str, Any]:
        con = library.cursor()
        inside = con.execute("""
            SELECT min(i.media_id) AS media_id, count(*) OVER () AS images FROM map m JOIN images i USING (sha256)
            WHERE m.scope = ? AND m.x BETWEEN ? AND ? AND m.y BETWEEN ? AND ?
            GROUP BY m.sha256 ORDER BY media_id LIMIT ?""",
                             [scope, min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1), k]).fetchall()
        rows = _rows(con, [m for m, _ in inside])
        return {"images": inside[0][1] if inside else 0, "results": [_result(rows[m], 1.0) for m, _ in inside]}

    @app.get("/api/map", summary="The 2-D map: one point per image, coloured by cluster")
    def api_map(scope: str = ALL_ACCOUNTS) -> dict[str, Any]:
        con = library.cursor()
        points = con.execute("""
            SELECT m.sha256, m.x, m.y, any_value(c.cluster) AS cluster, min(i.media_id) AS media_id
            FROM map m JOIN images i USING (sha256)
            LEFT JOIN clusters c ON c.sha256 = m.sha256 AND c.scope = m.scope
            WHERE m.scope = ? GROUP BY ALL ORDER BY media_id""", [scope]).fetchall()
        legend = con.execute("""
            SELECT cluster, any_value(cluster_name), count(*) FROM clusters WHERE scope = ?
            GROUP BY cluster ORDER BY count(*) DESC, cluster""", [scope]).fetchall()
        return {"scope": scope,
                "points": [{"sha256": h, "x": x, "y": y, "cluster": c, "media_id": m} for h, x, y, c, m in points],
                "clusters": [{"cluster": c, "name": n, "images": i} for c, n, i in legend],
                "hint": None if points else _not_analysed(library, "map")}

    @app.get("/api/duplicates", summary="Groups of exact and near duplicates")
    def api_duplicates(scope: str = ALL_ACCOUNTS) -> dict[str, Any]:
        con = library.cursor()
        found = con.execute("""
            SELECT group_id, any_value(kind), list({'media_id': media_id, 'account': account,
                   'thumbnail': '/thumb/' || sha256, 'similarity': similarity} ORDER BY similarity DESC)
            FROM duplicates WHERE scope = ? GROUP BY group_id ORDER BY group_id""", [scope]).fetchall()
        return {"groups": [{"group": g, "kind": kind, "images": members} for g, kind, members in found],
                "hint": None if found else _no_duplicates(library, scope)}

    @app.post("/api/sql", summary="One read-only SQL statement (only when started with --allow-sql)")
    def api_sql(body: SqlRequest) -> dict[str, Any]:
        if library.sql_limits is None:
            raise HTTPError(403, "SQL is off: start the app with --allow-sql to serve read-only SQL")
        try:
            answer = library.sandbox().run(body.sql)
        except duckdb.Error as e:
            if (found := doctor.unreadable(e)) is not None:
                raise HTTPError(503, str(found)) from None
            raise HTTPError(400, f"the statement failed: {e}") from None
        return {"columns": answer.columns, "truncated": answer.truncated,
                "elapsed_ms": round(answer.elapsed_ms, 2), "limit": library.sql_limits.rows,
                "rows": jsonable_encoder(answer.rows, custom_encoder={bytes: bytes.hex})}

    def by_content(find, sha256: str, media_type: str | None = None) -> Response:
        """A file named by content address (or its bytes, made for this request): they never
        change behind the name."""
        try:
            found = find(library.data_dir, library.cursor(), sha256)
        except thumbs.NoSuchImage as e:
            raise HTTPError(404, str(e)) from None
        except images.BadImage as e:
            raise HTTPError(422, f"the stored image cannot be decoded: {e}") from None
        headers = {"Cache-Control": "public, max-age=31536000, immutable", "X-Content-Type-Options": "nosniff"}
        if isinstance(found, bytes):
            return Response(found, media_type=media_type, headers=headers)
        if media_type is None:  # the type comes from the bytes' header, not the name (no full decode)
            with Image.open(found) as img:
                media_type = Image.MIME.get(img.format or "", "application/octet-stream")
        return FileResponse(found, media_type=media_type, headers=headers)

    @app.get("/media/{sha256}", summary="A stored image itself, by its sha256 (the image page only)")
    def media(sha256: str) -> Response:
        return by_content(thumbs.stored, sha256)

    @app.get("/thumb/{sha256}", summary="A thumbnail, by the sha256 of the stored image")
    def thumb(sha256: str) -> Response:
        return by_content(thumbs.thumbnail, sha256, "image/jpeg")

    return app


def _plain(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value


def serve(library: Library, host: str, port: int, token: str | None) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(library, token), host=host, port=port, log_level="warning")


@contextmanager
def running(library: Library, token: str | None = None, startup_s: float = 30) -> Iterator[str]:
    """The app served on a free port of 127.0.0.1 from a thread (tests, benchmarks); yields its URL."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(library, token), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the app did not start on 127.0.0.1:{port}")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        library.close()
