"""Model stages split over Dask workers: one library embedded (or captioned) by many at once.

On Dask, a model stage's task does not run the model itself: it counts the account's to-do
list, splits it into shards of about `[orchestration] dask_shard_images` images by content
hash (`member`), and submits one task per shard from its worker (a task that starts tasks:
it leaves its worker's thread pool while it waits). Each shard task loads the model where it
lands (with `dask_gpu_resource`, a worker holding one unit of it: one shard per GPU at a
time), computes its own to-do list (the stage's, restricted to its shard) and writes its own
parts. So no row is written twice: a shard run again after its worker died does only what
that worker had not written. The stage's task holds the model partition's lock for all its
shards (they do not take it), so the partition lock and the skip fingerprint mean what they
mean without Dask.
"""

from __future__ import annotations

import contextlib
import math
import uuid
from collections.abc import Callable
from typing import Any

from clipgram import dag, tables
from clipgram.config import Config, load_config
from clipgram.lock import partition_lock
from clipgram.result import StageResult

Shard = tuple[int, int]  # (index, count)
# a stage's work: settings, account, its shard (None: all of its to-do list) → its result
Work = Callable[[Config, str, "Shard | None"], StageResult]


def member(sha256: str, shard: Shard) -> bool:
    """Whether the image with this content hash is in `shard` (spread evenly: hex digits)."""
    index, count = shard
    return int(sha256[:8], 16) % count == index


def count_for(todo: int, size: int) -> int:
    return max(1, math.ceil(todo / size))


def _on_worker(work: Work, settings: dict[str, dict[str, Any]], account: str, shard: Shard) -> StageResult:
    """A shard task: settings travel as plain values and are read again where it lands
    (an object-store data dir's mirror is set up there)."""
    return work(load_config(overrides=settings, environ={}), account, shard)


def _worker() -> Any | None:
    """The Dask worker this task runs on, or None outside Dask."""
    try:
        from distributed import get_worker
    except ImportError:
        return None
    try:
        return get_worker()
    except ValueError:  # not in a worker's task
        return None


def sharded(cfg: Config) -> bool:
    """Whether a model stage running here splits its work into shard tasks."""
    return cfg.orchestration.task_runner == "dask" and cfg.orchestration.dask_shard_images > 0


def run(cfg: Config, stage: str, account: str, partitions: list[tuple[tables.Table, str]],
        pending: Callable[[], int], work: Work) -> StageResult:
    """`work` over the stage's to-do list (`pending` images, written to the model
    `partitions`): in this process, or on Dask as shard tasks."""
    if not sharded(cfg) or _worker() is None:
        return work(cfg, account, None)
    from distributed import worker_client

    model_id = partitions[0][1]
    todo = pending()
    if not todo:
        return StageResult(stage, account, note=model_id).log()
    count = count_for(todo, cfg.orchestration.dask_shard_images)
    resource = cfg.orchestration.dask_gpu_resource if dag.stage(stage).gpu else ""  # OCR: the CPU
    run_id = uuid.uuid4().hex[:8]
    with contextlib.ExitStack() as held:
        for table, model in sorted(partitions, key=lambda p: p[0].name):  # inference.run_heads' order
            held.enter_context(partition_lock(cfg.data_dir, table.name, model))
        client = held.enter_context(worker_client())
        settings = cfg.as_dict()
        futures = [client.submit(_on_worker, work, settings, account, (i, count), pure=False,
                                 key=f"{stage}-{account}-{run_id}-shard-{i}",
                                 resources={resource: 1} if resource else None)
                   for i in range(count)]
        results: list[StageResult] = client.gather(futures)
    merged = StageResult(stage, account, done=sum(r.done for r in results),
                         failed=sum(r.failed for r in results), note=model_id)
    merged.details["shards"] = count
    counts = {k for r in results for k, v in r.details.items() if type(v) is int}
    for key in sorted(counts):  # the shards' passes' counts (decoded, captioned, …), added up
        merged.details[key] = sum(r.details.get(key, 0) for r in results)
    return merged.log()
