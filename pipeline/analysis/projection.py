"""A 2-D map of the images: stored embeddings projected (UMAP when installed, else PCA),
drawn as a PNG of thumbnails and as an interactive HTML page (pan, zoom, links to posts)."""

from __future__ import annotations

import html
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from clipgram import catalog, images, storage
from clipgram.analysis import derived, fits
from clipgram.result import StageResult
from clipgram.stages import publish

log = logging.getLogger("clipgram")

PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
           "#bfef45", "#469990", "#9a6324", "#800000", "#000075"]


def project(x: np.ndarray, method: str = "auto") -> tuple[np.ndarray, str, dict[str, np.ndarray]]:
    """(n, 2) coordinates scaled to [0, 1], the method used (umap or pca), and what places a
    new point on the same map (PCA's mean, axes and scaling; nothing for UMAP)."""
    projection: dict[str, np.ndarray] = {}
    if method in ("auto", "umap"):
        try:
            import umap  # optional: a better map of local neighbourhoods

            xy, method = umap.UMAP(n_components=2, metric="cosine", random_state=0).fit_transform(x), "umap"
        except ImportError:
            if method == "umap":
                raise RuntimeError("--method umap needs umap-learn: pip install umap-learn") from None
            method = "pca"
    if method == "pca":
        mean = x.mean(axis=0)
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        axes = np.pad(vt[:2], ((0, 2 - len(vt[:2])), (0, 0)))  # fewer than 2 images: a flat map
        projection = {"mean": mean, "axes": axes}
        xy = (x - mean) @ axes.T
    low, span = xy.min(axis=0), np.ptp(xy, axis=0)
    span = np.where(span > 0, span, 1)
    projection = {**projection, "low": low, "span": span} if projection else {}
    return (xy - low) / span, method, projection


def place(x: np.ndarray, projection: dict[str, np.ndarray]) -> np.ndarray:
    """New points on a fitted PCA map (outside [0, 1] when they lie beyond every fitted one)."""
    return ((x - projection["mean"]) @ projection["axes"].T - projection["low"]) / projection["span"]


def _points(data_dir: Path, model: str, scope: str) -> list[tuple]:
    """(sha256, x, y, path, permalink, caption, cluster) per image on the stored map."""
    with catalog.connect(data_dir) as con:
        return con.execute("""
            SELECT m.sha256, m.x, m.y, any_value(i.path), any_value(i.permalink),
                   any_value(coalesce(i.generated_caption, i.post_caption, '')), any_value(c.cluster)
            FROM map m JOIN images i USING (sha256)
            LEFT JOIN clusters c ON c.sha256 = m.sha256 AND c.scope = m.scope
            WHERE m.scope = ? GROUP BY ALL ORDER BY m.sha256""", [scope]).fetchall()


def write_png(data_dir: Path, points: list[tuple], out: Path, size: int = 1600, thumb: int = 64) -> Path:
    """Thumbnails at their map positions, framed in their cluster's colour when clustered."""
    canvas = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(canvas)
    span = size - thumb - 8
    storage.ensure_local(data_dir / point[3] for point in points)
    for _sha, x, y, path, _link, _caption, cluster in points:
        left, top = int(4 + x * span), int(4 + (1 - y) * span)
        picture = images.load_rgb(data_dir / path)
        picture.thumbnail((thumb, thumb))
        if cluster is not None:
            colour = PALETTE[cluster % len(PALETTE)]
            draw.rectangle((left - 3, top - 3, left + picture.width + 2, top + picture.height + 2), fill=colour)
        canvas.paste(picture, (left, top))
    out.parent.mkdir(parents=True, exist_ok=True)
    with storage.replacing(out, to_store=False) as tmp:  # a map of its own, not the library's
        canvas.save(tmp, format="PNG")
    return out


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>clipgram map: {title}</title>
<link rel="icon" href="data:,">  <!-- no icon: else browsers log a 404 for /favicon.ico -->
<style>
body {{ margin: 0; font-family: system-ui, sans-serif; background: #fafafa; }}
header {{ padding: .6rem 1rem; }} svg {{ width: 100vw; height: calc(100vh - 3rem); cursor: grab; }}
image:hover {{ outline: 2px solid #000; }}
</style></head><body>
<header>clipgram map of <b>{title}</b> ({method}) — drag to pan, wheel to zoom, click a picture for its post</header>
<svg id="map" viewBox="0 0 1000 1000">{items}</svg>
<script>
const svg = document.getElementById("map");
let box = svg.viewBox.baseVal, drag = null;
svg.addEventListener("wheel", e => {{
  e.preventDefault();
  const f = e.deltaY > 0 ? 1.15 : 1 / 1.15, r = svg.getBoundingClientRect();
  const px = box.x + box.width * (e.clientX - r.left) / r.width;
  const py = box.y + box.height * (e.clientY - r.top) / r.height;
  box.x = px - (px - box.x) * f; box.y = py - (py - box.y) * f; box.width *= f; box.height *= f;
}}, {{passive: false}});
svg.addEventListener("mousedown", e => drag = [e.clientX, e.clientY]);
window.addEventListener("mouseup", () => drag = null);
window.addEventListener("mousemove", e => {{
  if (!drag) return;
  const r = svg.getBoundingClientRect();
  box.x -= (e.clientX - drag[0]) * box.width / r.width; box.y -= (e.clientY - drag[1]) * box.height / r.height;
  drag = [e.clientX, e.clientY];
}});
</script></body></html>
"""


def write_html(data_dir: Path, points: list[tuple], out: Path, title: str, method: str) -> Path:
    """An SVG page of the thumbnails (relative links: it moves with the data directory)."""
    span = 940  # of the 1000-unit canvas: a 36-unit frame at 22 + span stays inside
    items = []
    for _sha, x, y, path, link, caption, cluster in points:
        src = os.path.relpath(data_dir / path, out.parent)
        frame = (f'<rect x="{x * span + 22:.1f}" y="{(1 - y) * span + 22:.1f}" width="36" height="36" '
                 f'fill="{PALETTE[cluster % len(PALETTE)]}"/>') if cluster is not None else ""
        items.append(f'<a href="{html.escape(link)}">{frame}<image href="{html.escape(src)}" '
                     f'x="{x * span + 25:.1f}" y="{(1 - y) * span + 25:.1f}" width="30" height="30">'
                     f'<title>{html.escape(caption)}</title></image></a>')
    out.parent.mkdir(parents=True, exist_ok=True)
    with storage.replacing(out, to_store=False) as tmp:
        tmp.write_text(_PAGE.format(title=html.escape(title), method=method, items="\n".join(items)))
    return out


def _rows(shas: list[str], xy: np.ndarray, method: str) -> list[dict]:
    return [{"sha256": sha, "x": float(a), "y": float(b), "method": method} for sha, (a, b) in zip(shas, xy)]


def fit(data_dir: Path, model: str, account: str | None, method: str = "auto",
        config: dict | None = None) -> StageResult:
    """Project the images anew and store the `map` table, and the projection when new points
    can be placed on it (PCA) for `extend`."""
    found = derived.vectors(data_dir, model, account)
    scope = account or derived.ALL_ACCOUNTS
    if not found.shas:
        raise derived.AnalysisError(f"no embedded images in {derived.scope_label(scope)}: run `clipgram ingest` first")
    xy, method, projection = project(found.of(), method)
    derived.replace(data_dir, derived.MAP, scope, model, _rows(found.shas, xy, method))
    fits.save(data_dir, "map", scope, model, fits.Fit(
        {"images": len(found.shas), "method": method, **fits.config_meta(config)}, {k: v.astype(np.float32) for k, v in projection.items()}))
    return StageResult("map", derived.scope_label(scope), done=len(found.shas), note=method)


def extend(data_dir: Path, model: str, scope: str, found: derived.Vectors, new: list[int],
           fit: fits.Fit) -> int:
    """Place the images at positions `new` of `found` on the stored map; 0 when it cannot (UMAP)."""
    if "axes" not in fit.arrays:
        return 0
    xy = place(found.of(new), fit.arrays)
    derived.append(data_dir, derived.MAP, scope, model, _rows([found.shas[i] for i in new], xy, fit.meta["method"]))
    return len(new)


def run(data_dir: Path, model: str, account: str | None, png: Path, page: Path | None,
        method: str = "auto") -> StageResult:
    """Project the images, store the `map` table, then draw the PNG (and the HTML page)."""
    result = fit(data_dir, model, account, method)
    scope = account or derived.ALL_ACCOUNTS
    publish.republish(data_dir, derived.scope_label(scope))  # the map view must exist before it is drawn from
    points = _points(data_dir, model, scope)
    write_png(data_dir, points, png)
    if page is not None:
        write_html(data_dir, points, page, derived.scope_label(scope), result.note)
    return StageResult("map", result.account, done=result.done, note=f"{result.note}: {png}"
                       + (f" and {page}" if page else ""))
