"""`python -m bench.app`: the app's latency, driven over HTTP on 127.0.0.1.

A library of N images (default 100,000) is written as the stages write it: posts and media
rows, one real JPEG (every media row points at it: thumbnails need a stored file), random
unit vectors as the offline CLIP's embeddings, then the real publish stage (catalog, search
documents, vector index) and analyse stage (clusters, the map), and the relevance cutoff's
caption banks from the scenes' captions (the library has no generated ones). `clipgram app` runs in a
uvicorn server on a thread; a client sends warm text queries (the model loaded and the first
query done) in CLIP and hybrid mode, and fetches a cached thumbnail; headless Chromium loads
the search page (first paint) and pans the map (frames per second with every point a dot,
and zoomed in until pictures replace them). ViT-B-32's text tower (random weights: the cost does not
depend on them) is timed apart, as what a real model adds to each text query; so are reading
filters from a query (`query_read_ms`) and judging which of 24 results match (`cutoff_ms`),
in process. Results merge
into bench/results.json under "app".
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import tempfile
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench import save_section
from bench.search import random_unit_vectors
from clipgram import synthetic, tables
from clipgram.config import Config, load_config

ACCOUNT = "bench-app"
QUERIES = ["a red circle", "a blue square", "a green triangle", "a yellow shape", "a black circle",
           "a white square", "an orange triangle", "a purple circle"]


def library_settings(data_dir: Path) -> tuple[Config, str, int]:
    """A bench library's settings (the offline CLIP, on the CPU), its model id and dimension."""
    from clipgram.models import clip

    cfg = load_config(overrides={"data": {"dir": str(data_dir)}, "models": {"clip": "tiny", "device": "cpu"}},
                      environ={})
    encoder = clip.from_config(cfg.models)
    return cfg, encoder.id, int(encoder.encode_text(["x"]).shape[1])


def build_library(data_dir: Path, images: int, model_id: str, dim: int, first: int = 0) -> None:
    """`images` posts of one picture each, numbered from `first` (a later call adds a part)."""
    picture = data_dir / "media" / "00" / "bench.jpg"
    picture.parent.mkdir(parents=True, exist_ok=True)
    synthetic.render(synthetic.Scene("circle", "red", "blue"), 640, random.Random(0)).save(picture, quality=90)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    posts, media, shas = [], [], []
    for i in range(first, first + images):
        shortcode = f"B{i:07d}"
        scene = synthetic.all_scenes()[i % len(synthetic.all_scenes())]
        posts.append(tables.post_row(shortcode=shortcode, post_id=i, owner_username=ACCOUNT,
                                     taken_at=start + timedelta(minutes=i), caption=scene.caption,
                                     hashtags=[scene.color, scene.shape], mentions=[], likes=i % 1000,
                                     comments=0, is_video=False, typename="GraphImage",
                                     permalink=f"https://www.instagram.com/p/{shortcode}/", media_count=1))
        sha = hashlib.sha256(f"{i}".encode()).hexdigest()
        shas.append(sha)
        media.append({**tables.media_row(shortcode, 0, f"https://example.invalid/{i}.jpg"), "status": "done",
                      "sha256": sha, "path": str(picture.relative_to(data_dir)), "width": 640, "height": 640,
                      "bytes": picture.stat().st_size})
    tables.write_part(data_dir, tables.POSTS, ACCOUNT, posts)
    tables.write_part(data_dir, tables.MEDIA, ACCOUNT, media)
    vectors = np.concatenate(list(random_unit_vectors(images, dim, seed=1 + first)))
    tables.write_part(data_dir, tables.EMBEDDINGS, model_id,
                      ({"sha256": s, "embedding": v, "error": None} for s, v in zip(shas, vectors.tolist())))


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    return {"p50_ms": round(statistics.median(ms), 2), "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 2),
            "n": len(ms)}


def _timed(client: httpx.Client, path: str, params: dict | None = None) -> float:
    start = time.perf_counter()
    response = client.get(path, params=params)
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    return elapsed


def load_test(client: httpx.Client, sha: str, requests: int, clients: int) -> dict[str, Any]:
    """`requests` mixed requests from `clients` threads at once: every one must succeed."""
    from concurrent.futures import ThreadPoolExecutor

    similar_to = client.get("/api/search", params={"q": "a shape", "k": 1, "mode": "clip"}).json()["results"][0]
    mix = [("/api/search", {"q": QUERIES[0], "k": 24, "mode": "clip"}),
           ("/api/search", {"q": QUERIES[1], "k": 24, "mode": "hybrid", "min_likes": 500}),
           (f"/api/similar/{similar_to['media_id']}", {"k": 24}), (f"/thumb/{sha}", None),
           ("/api/status", None), ("/api/clusters", None)]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        seconds = list(pool.map(lambda i: _timed(client, *mix[i % len(mix)]), range(requests)))
    return {"requests": requests, "clients": clients, "errors": 0,  # _timed raises on any error
            "wall_s": round(time.perf_counter() - started, 2), **_percentiles(seconds)}


# resolve, in the page, to milliseconds since navigation: the first contentful paint (which
# may come after the load event), and the first result card drawn
FIRST_PAINT = """new Promise((resolve) => {
  new PerformanceObserver((list) => {
    const paint = list.getEntriesByName('first-contentful-paint')[0];
    if (paint) resolve(paint.startTime);
  }).observe({ type: 'paint', buffered: true });
  setTimeout(() => resolve(null), 10000); })"""
FIRST_RESULT = """new Promise((resolve) => {
  const check = () => document.querySelector('#results .card') ? resolve(performance.now())
                                                               : requestAnimationFrame(check);
  check(); })"""


def page_paint(url: str, loads: int = 5) -> dict[str, Any] | None:
    """Headless Chromium on the search page: its first contentful paint, and for a query in
    the address, the time until the first result is drawn (medians of `loads` page loads,
    after one that warms the browser). None without Chromium (`make browser`)."""
    from bench.browser import CHROMIUM, chromium, open_page

    if CHROMIUM is None:
        return None
    with tempfile.TemporaryDirectory(prefix="clipgram-bench-chromium-", ignore_cleanup_errors=True) as profile, \
            chromium(Path(profile)) as page:
        open_page(page, f"{url}/?q=warm+up")
        paint, results = [], []
        for i in range(loads):
            open_page(page, f"{url}/")
            paint.append(page.evaluate(FIRST_PAINT))
            open_page(page, f"{url}/?q={QUERIES[i % len(QUERIES)].replace(' ', '+')}")
            results.append(page.evaluate(FIRST_RESULT))
    if None in paint:
        raise RuntimeError("Chromium reported no first-contentful-paint for the search page in 10 s")
    return {"first_paint_ms": round(statistics.median(paint), 1),
            "first_results_ms": round(statistics.median(results), 1), "loads": loads}


# In the page: pan the map one frame at a time (each frame moved and drawn, as a drag does),
# zoomed out (every point a dot) and zoomed in until pictures replace the dots
MAP_PAN = """(async () => {
  const fps = async (frames) => {
    const at = [];
    for (let i = 0; i < frames; i++) {
      await new Promise((r) => requestAnimationFrame(r));
      map.dx += 3; drawMap(); at.push(performance.now());
    }
    return (at.length - 1) * 1000 / (at[at.length - 1] - at[0]);
  };
  const out = { points: map.points.length, dots_fps: await fps(120) };
  const c = document.querySelector('#map'), mx = c.width / 2, my = c.height / 2;
  while (map.drawn > THUMBS_AT) {
    map.dx = mx - (mx - map.dx) * 1.5; map.dy = my - (my - map.dy) * 1.5; map.scale *= 1.5; drawMap();
  }
  const loaded = () => [...map.thumbs.values()].filter((i) => i.complete).length;
  for (let waited = 0; loaded() < map.drawn && waited < 20000; waited += 100) await new Promise((r) => setTimeout(r, 100));
  out.zoom = map.scale; out.pictures = map.drawn; out.pictures_loaded = loaded();
  out.pictures_fps = await fps(120);
  return out;
})()"""


def map_pan(url: str) -> dict[str, Any] | None:
    """Headless Chromium on the map page: how long until its points are drawn, and frames per
    second while panning zoomed out (dots) and zoomed in (pictures). None without Chromium."""
    from bench.browser import CHROMIUM, chromium, open_page

    if CHROMIUM is None:
        return None
    with tempfile.TemporaryDirectory(prefix="clipgram-bench-chromium-", ignore_cleanup_errors=True) as profile, \
            chromium(Path(profile)) as page:
        page.send("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
        started = time.perf_counter()
        open_page(page, f"{url}/map")
        while not page.evaluate("map.points.length"):
            time.sleep(0.02)
        loaded_s = time.perf_counter() - started
        figures = page.evaluate(MAP_PAN)
    return {"load_s": round(loaded_s, 2), **{k: round(v, 1) if isinstance(v, float) else v
                                             for k, v in figures.items()}}


def query_read_ms(repeats: int = 200) -> float:
    """Median ms to read filters from a query (clipgram.query), over queries with and without them."""
    from clipgram import query, search

    texts = [*QUERIES, "a red circle in July 2023 by @nasa", "a blue square #minimal with over 500 likes",
             "summer dress", "a green triangle between May and August 2023"]
    times = []
    for i in range(repeats):
        started = time.perf_counter()
        query.read(texts[i % len(texts)], search.Filters(), date(2026, 12, 7))
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 3)


def prepare(cfg: Config, images: int, model_id: str, dim: int) -> None:
    """A library of `images` as the stages leave it: written, published, analysed."""
    from clipgram.stages.analyse import analyse
    from clipgram.stages.publish import publish

    build_library(cfg.data_dir, images, model_id, dim)
    publish(cfg.data_dir, model_id, dim, None)
    analyse(cfg, ACCOUNT)


def fit_relevance(cfg: Config, model_id: str) -> None:
    """The relevance cutoff's caption banks (analysis/relevance.py), from the scenes' captions:
    the bench library has no generated captions for the analyse stage to fit them from."""
    from clipgram.analysis import relevance
    from clipgram.models import clip

    encoder = clip.from_config(cfg.models)
    captions = [s.caption for s in synthetic.all_scenes()]
    relevance.fit(cfg.data_dir, model_id, "bench", captions, encoder.encode_text, encoder.logit_scale)


def cutoff_ms(cfg: Config, repeats: int = 200) -> float:
    """Median ms the relevance cutoff adds to a query of 24 results (search.judged: their
    vectors against the caption bank of the query's length)."""
    from clipgram import catalog, search
    from clipgram.models import clip

    encoder = clip.from_config(cfg.models)
    times = []
    with catalog.connect(cfg.data_dir) as con:
        index = search.VectorIndex.open(con, cfg.data_dir)
        for i in range(repeats):
            terms = [search.Term("text", QUERIES[i % len(QUERIES)])]
            vector = search.query_vector(con, index, terms, encoder)
            ranked = search.vector_ranking(con, index, vector, 24, search.Filters())
            hits = search.search(con, cfg.data_dir, terms, 24, "clip", encoder=encoder)[1]
            started = time.perf_counter()
            search.judged(con, cfg.data_dir, index, terms, vector, hits, encoder.id,
                          {m: r for m, _, r in ranked})
            times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 3)


def vit_b32_text_ms(repeats: int = 20) -> float:
    import open_clip
    import torch

    model = open_clip.create_model("ViT-B-32")  # random weights: the cost is the architecture's
    tokens = open_clip.get_tokenizer("ViT-B-32")(["a photo of a red circle"])
    with torch.inference_mode():
        model.encode_text(tokens)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.encode_text(tokens)
            times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 2)


def run(images: int, repeats: int, built: Path | None = None) -> dict[str, Any]:
    """The app's figures over a library of `images` built here, or over `built`: a data dir
    that bench.analyse left, built, published and analysed (make bench: the same library)."""
    from clipgram.app import library, server

    with tempfile.TemporaryDirectory(prefix="clipgram-bench-app-") as work:
        data_dir = built or Path(work) / "data"
        cfg, model_id, dim = library_settings(data_dir)
        started = time.perf_counter()
        if built is None:
            prepare(cfg, images, model_id, dim)
        else:
            images = tables.connect(data_dir).execute("SELECT count(*) FROM media").fetchone()[0]
        fit_relevance(cfg, model_id)
        build_s = time.perf_counter() - started
        lib = library.Library(data_dir, cfg.models)
        with server.running(lib) as url, httpx.Client(base_url=url, timeout=60) as client:
            for mode in ("clip", "hybrid"):  # warm: the model loaded, the first query run
                _timed(client, "/api/search", {"q": "warm up", "k": 24, "mode": mode})
            figures: dict[str, Any] = {}
            for mode in ("clip", "hybrid"):
                figures[f"text_{mode}"] = _percentiles([
                    _timed(client, "/api/search", {"q": QUERIES[i % len(QUERIES)], "k": 24, "mode": mode})
                    for i in range(repeats)])
            sha = client.get("/api/search", params={"q": "a red circle", "k": 1}).json()["results"][0]["sha256"]
            first = _timed(client, f"/thumb/{sha}")
            figures["thumbnail_cached"] = _percentiles([_timed(client, f"/thumb/{sha}") for _ in range(repeats)])
            figures["thumbnail_first_ms"] = round(first * 1000, 2)
            figures["load"] = load_test(client, sha, requests=1000, clients=8)
            figures["page"] = page_paint(url)
            figures["map"] = map_pan(url)
        figures["cutoff_ms"] = cutoff_ms(cfg)
    return {"images": images, "library_build_s": round(build_s, 1), "model": model_id, **figures,
            "vit_b32_text_encode_ms": vit_b32_text_ms(), "query_read_ms": query_read_ms(),
            # what reading filters and judging matches add to a query together (issue 29: ≤ 2 ms)
            "goals": {"text_p50_ms": 50, "text_p95_ms": 150, "thumbnail_ms": 5, "first_paint_ms": 1000,
                      "map_fps": 30, "query_read_plus_cutoff_ms": 2}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    args = parser.parse_args()
    save_section(args.out, "app", run(args.images, args.repeats))


if __name__ == "__main__":
    main()
