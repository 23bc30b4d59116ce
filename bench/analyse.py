"""`python -m bench.analyse`: the analyse stage's time, first run and incremental, at 10k and 100k images.

A library of N images is written as the stages write it (bench.app's: posts, media, random unit
vectors as the offline CLIP's embeddings, 64-d) and published; the analyse stage then runs on it
(labels of configs/labels.toml, clusters with k chosen, the PCA map, near-duplicates):
`first_s`. Then 10 new images are ingested as rows and published (the publish stage's time, not
counted), and the stage runs again, placing them on the stored fits: `incremental_s`. Random
vectors do not cluster, which makes choosing k and near-duplicates no cheaper than real ones.
Results merge into bench/results.json under "analyse".
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import save_section
from bench.app import ACCOUNT, build_library, library_settings
from clipgram import tables

SIZES = (10_000, 100_000)
NEW = 10


def _add_images(data_dir: Path, model_id: str, dim: int, first: int, count: int) -> None:
    """`count` more posts of one image each, with their embeddings, as the stages leave them."""
    media = tables.rows(tables.connect(data_dir), tables.MEDIA, "TRUE LIMIT 1", [])[0]
    posts, rows, vectors = [], [], np.random.default_rng(first).standard_normal((count, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    shas = [hashlib.sha256(f"new-{first + i}".encode()).hexdigest() for i in range(count)]
    for i, sha in enumerate(shas):
        shortcode = f"N{first + i:07d}"
        posts.append(tables.post_row(shortcode=shortcode, post_id=first + i, owner_username=ACCOUNT,
                                     caption="a new post", hashtags=[], mentions=[], likes=0, comments=0,
                                     is_video=False, typename="GraphImage", media_count=1,
                                     permalink=f"https://www.instagram.com/p/{shortcode}/"))
        rows.append({**media, "media_id": f"{shortcode}_0", "shortcode": shortcode, "sha256": sha})
    tables.write_part(data_dir, tables.POSTS, ACCOUNT, posts)
    tables.write_part(data_dir, tables.MEDIA, ACCOUNT, rows)
    tables.write_part(data_dir, tables.EMBEDDINGS, model_id,
                      ({"sha256": s, "embedding": v, "error": None} for s, v in zip(shas, vectors.tolist())))


def run_size(images: int, keep: Path | None = None) -> dict[str, Any]:
    """First and incremental analyse of a library of `images`; it is left at `keep` when given
    (make bench's app section then serves it)."""
    from clipgram.stages.analyse import analyse
    from clipgram.stages.publish import publish

    with tempfile.TemporaryDirectory(prefix="clipgram-bench-analyse-") as work:
        data_dir = keep or Path(work) / "data"
        cfg, model_id, dim = library_settings(data_dir)
        build_library(data_dir, images, model_id, dim)
        publish(data_dir, model_id, dim, None)
        started = time.perf_counter()
        first = analyse(cfg, ACCOUNT)
        first_s = time.perf_counter() - started
        _add_images(data_dir, model_id, dim, images, NEW)
        publish(data_dir, model_id, dim, None)
        started = time.perf_counter()
        again = analyse(cfg, ACCOUNT)
        incremental_s = time.perf_counter() - started
    return {"images": images, "dim": dim, "first_s": round(first_s, 2), "first_note": first.note,
            "incremental_s": round(incremental_s, 3), "incremental_images": NEW, "incremental_note": again.note}


def run(sizes: tuple[int, ...] = SIZES, keep: Path | None = None) -> dict[str, Any]:
    """Each size in turn; the library of the largest is left at `keep` when given."""
    return {"sizes": [run_size(n, keep if n == max(sizes) else None) for n in sizes],
            "goals": {"incremental_s_at_100k": 1.0}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    args = parser.parse_args()
    save_section(args.out, "analyse", run(tuple(args.sizes)))


if __name__ == "__main__":
    main()
