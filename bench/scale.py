"""`python -m bench.scale`: does one library embed faster on two Dask workers than on one?

One account of `--images` JPEGs (640 px, a folder source) is scanned and downloaded once,
then embedded from scratch by the embed stage's Dask task (shards.py) on a LocalCluster of
one worker process and then of two, one torch thread and no decode workers each, so that
each worker is one core's worth of work. The model is open_clip's ViT-S-32 with random
weights (the FLOPs of the real model, a quarter of ViT-B-32's: the bench stays short), loaded
from a checkpoint file as a user's own would be, once per worker. `sharded_speedup` is the
one-worker stage time over the two-worker one (goal, issue 16: at least 1.6 on 2 cores);
cluster start-up, which a long-lived cluster pays once, is reported apart. Results merge
into bench/results.json under "scale".
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import save_section
from clipgram import runner, tables
from clipgram.config import Config, load_config

ACCOUNT = "bench-scale"
ARCH = "ViT-S-32"
SHARD_IMAGES = 250


def random_checkpoint(path: Path) -> Path:
    import open_clip
    import torch

    torch.manual_seed(0)
    torch.save(open_clip.create_model(ARCH).state_dict(), path)
    return path


def _config(data_dir: Path, checkpoint: Path, address: str = "") -> Config:
    return load_config(overrides={
        "data": {"dir": str(data_dir)}, "models": {"clip": f"{ARCH}:{checkpoint}", "device": "cpu"},
        "embed": {"batch_size": 32}, "decode": {"workers": 0},
        "orchestration": {"task_runner": "dask", "dask_address": address,
                          "dask_shard_images": SHARD_IMAGES}}, environ={})


def embed_on(workers: int, data_dir: Path, checkpoint: Path) -> dict[str, Any]:
    """The embed stage over every image of `data_dir`, on a fresh cluster of `workers`."""
    from distributed import Client, LocalCluster

    start = time.perf_counter()
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.WARNING, env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
                      ) as cluster, Client(cluster) as client:
        client.run(lambda: __import__("clipgram.stages.embed"))  # imports: part of starting a worker
        started = time.perf_counter() - start
        cfg = _config(data_dir, checkpoint, cluster.scheduler_address)
        start = time.perf_counter()
        result = client.submit(runner.run_stage, cfg, f"bench-{workers}", ACCOUNT, "embed", pure=False).result()
        seconds = time.perf_counter() - start
    return {"workers": workers, "images": result.done, "shards": result.details.get("shards"),
            "cluster_start_s": round(started, 1), "stage_s": round(seconds, 1),
            "ips": round(result.done / seconds, 1)}


def run(images: int = 2000) -> dict[str, Any]:
    from bench.throughput import make_jpegs

    logging.getLogger("distributed").setLevel(logging.WARNING)  # the scheduler's lines, in this process
    with tempfile.TemporaryDirectory(prefix="clipgram-bench-scale-") as work:
        root = Path(work)
        folder = make_jpegs(root / ACCOUNT, images, 640)[0].parent
        checkpoint = random_checkpoint(root / f"{ARCH}-random.pt")
        base = root / "downloaded"
        cfg = load_config(overrides={"data": {"dir": str(base)}}, environ={})
        for stage in ("scrape", "download"):
            runner.run_stage(cfg, "bench", ACCOUNT, stage, source=str(folder))
        runs = []
        for workers in (1, 2):
            data_dir = root / f"workers-{workers}"
            shutil.copytree(base, data_dir)
            runs.append(embed_on(workers, data_dir, checkpoint))
            assert tables.connect(data_dir).execute("SELECT count(*) FROM embeddings").fetchone()[0] == images
    one, two = runs
    return {"model": f"{ARCH} (random weights)", "images": images, "shard_images": SHARD_IMAGES,
            "one_worker": one, "two_workers": two,
            "sharded_speedup": round(one["stage_s"] / two["stage_s"], 2), "goal": 1.6}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    args = parser.parse_args(argv)
    save_section(args.out, "scale", run(args.images))


if __name__ == "__main__":
    main()
