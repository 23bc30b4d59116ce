"""The shared loop of the model stages: stored images → batches → model → Parquet parts.

Work is keyed by image content: the to-do list is every downloaded sha256 of
the account minus those already in the model's partition (an anti-join), so
a rerun does only what is left and a repost is processed once. Images are
decoded while the model runs (pipeline.loader). With `batch_size = "auto"` on
CUDA the batch size is found by trying the model on growing batches
(`largest_batch`); batches that still do not fit in GPU memory are split in
half until they do.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from clipgram import loader, shards, storage, tables
from clipgram.lock import partition_lock
from clipgram.result import StageResult

log = logging.getLogger("clipgram.inference")

Rows = list[dict[str, Any]]
Deferred = Callable[[], Rows]  # rows still being computed on the device: calling waits for them


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's out-of-memory error, or a library's allocation failure reported as a RuntimeError
    (cuBLAS, cuDNN): both mean the batch is too big, not that an image is bad."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and any(
            words in str(error) for words in ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED")))


class HalveOnOOM:
    """Call `fn` on the batch in chunks, halving the chunk size whenever CUDA runs out of memory."""

    def __init__(self, fn: Callable[[torch.Tensor], Rows | Deferred], limit: int):
        self.fn, self.limit = fn, limit

    def __call__(self, batch: torch.Tensor) -> Deferred:
        parts: list[Rows | Deferred] = []
        start = 0
        while start < len(batch):
            chunk = batch[start:start + self.limit]
            try:
                parts.append(self.fn(chunk))
                start += len(chunk)
                continue
            except Exception as e:
                if not is_out_of_memory(e) or self.limit == 1:
                    raise
            # out of the except block: the failed attempt's tensors are freed before the cache is
            torch.cuda.empty_cache()
            self.limit //= 2
            log.warning("CUDA out of memory: batch size lowered to %d", self.limit)
        return lambda: [row for part in parts for row in (part() if callable(part) else part)]


def largest_batch(seconds_for: Callable[[int], float | None], start: int, limit: int,
                  tolerance: float = 0.95) -> int:
    """The largest batch size, from `start` doubling up to `limit`, that fits and is not slower.

    `seconds_for(n)` runs one batch of n images and returns its seconds, or None when it
    does not fit. Growth stops at the first size that does not fit or whose images/s
    falls below `tolerance` × the best so far (past the device's saturation a bigger
    batch only costs memory). If even `start` does not fit, it is halved until one does.
    """
    n = start
    while (seconds := seconds_for(n)) is None:
        if n == 1:
            raise RuntimeError("not even one image fits in the device's memory")
        n //= 2
    best, best_ips = n, n / seconds
    grow = n == start  # a start that had to be halved is already past what fits
    while grow and n * 2 <= limit:
        n *= 2
        seconds = seconds_for(n)
        grow = seconds is not None and n / seconds >= tolerance * best_ips
        if grow:
            best, best_ips = n, max(best_ips, n / seconds)
    return best


# Most of a device's memory, not all: the loop keeps the next batch queued beside this one
PROBE_MEMORY_SHARE = 0.8
_probed: dict[tuple[str, str, str], int] = {}  # (stage, model id, device) → batch size
_clock = time.perf_counter  # the probe's clock (a test's stand-in for a device's timings)


def _probe_batch_size(stage: str, model_id: str, model_fn: Callable[[torch.Tensor], Rows | Deferred],
                      sample: torch.Tensor, device: torch.device, settings: loader.LoaderSettings) -> int:
    """`largest_batch` for `model_fn`, timed on copies of one real input (once per process).

    Each size runs twice and the second run is timed: the first of a new shape pays for
    the allocator's growth and the kernels' selection, which a stage pays only once.
    """
    key = (stage, model_id, str(device))
    if key in _probed:
        return _probed[key]
    cuda = device.type == "cuda"
    budget = PROBE_MEMORY_SHARE * torch.cuda.get_device_properties(device).total_memory if cuda else None

    def run(n: int) -> float | None:
        batch = sample.to(device)[None].expand(n, *sample.shape).contiguous()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = _clock()
        try:
            out = model_fn(batch)
            out() if callable(out) else out  # waiting for the rows waits for the device
            return _clock() - start
        except Exception as e:
            if not is_out_of_memory(e):
                raise
        del batch
        torch.cuda.empty_cache()
        return None

    def seconds_for(n: int) -> float | None:
        if run(n) is None:  # the first run of a size, untimed
            return None
        seconds = run(n)
        if seconds is None or (budget is not None and torch.cuda.max_memory_allocated(device) > budget):
            return None
        log.debug("%s batch-size probe: %d images in %.3f s", stage, n, seconds)
        return seconds

    size = largest_batch(seconds_for, settings.batch_size, settings.probe_batch)
    log.info("%s: batch size auto → %d (tried %d to %d on %s)", stage, size, settings.batch_size,
             settings.probe_batch, device)
    _probed[key] = size
    return size


def _first_input(dataset: loader.ImageFiles, device: torch.device) -> torch.Tensor | None:
    """The model's input for the first image that decodes, or None when none does."""
    for i in range(len(dataset)):
        try:
            return dataset.finish(dataset.decode(i).to(device)[None])[0]
        except Exception:  # that image fails where the stage decodes it, with the reason
            continue
    return None


def pending(data_dir: Path, table: tables.Table, model_id: str, account: str,
            retry_failed: bool = False) -> list[tuple[str, str]]:
    """(sha256, path) of the account's downloaded images missing from `table`'s model partition;
    with `retry_failed`, also those whose rows there all record an error."""
    con = tables.connect(data_dir)
    done = tables.scan_sql(table, data_dir, str(data_dir), model_id)
    succeeded = "WHERE error IS NULL" if retry_failed else ""
    return con.execute(
        f"""SELECT sha256, min(path) FROM media
            WHERE account = ? AND status = 'done'
              AND sha256 NOT IN (SELECT sha256 FROM ({done}) {succeeded})
            GROUP BY sha256 ORDER BY sha256""", [account]).fetchall()


def run(
    data_dir: Path,
    stage: str,
    account: str,
    table: tables.Table,
    model_id: str,
    preprocess: Callable,
    model_fn: Callable[[torch.Tensor], Rows | Deferred],
    *,
    device: torch.device,
    settings: loader.LoaderSettings,
    part_rows: int,
    failed_row: Callable[[str], dict[str, Any]] | None = None,
    retry_failed: bool = False,
    shard: shards.Shard | None = None,
) -> StageResult:
    """Apply `model_fn` to every pending image in batches, writing a part every `part_rows` rows.

    `model_fn` maps a batch on `device` to one row (without sha256) per image, or to a
    function returning them once the device is done: the rows are then collected only
    after the next batch is launched, so the device always has the next batch queued.
    An image that fails to decode is written as `failed_row(error)` when given,
    else logged and left pending; `retry_failed` takes those failed rows up again
    (rows `model_fn` gives with an error count as failed too). When the stage stops on
    an error, the rows finished before it are written first. `shard`: only the pending images
    of that shard (shards.py), under the lock its stage's task holds.
    """
    # embeddings and captions are keyed by content and shared by accounts: one writer per
    # model partition, so two accounts that share an image never both find it pending
    with partition_lock(data_dir, table.name, model_id) if shard is None else contextlib.nullcontext():
        todo = pending(data_dir, table, model_id, account, retry_failed and failed_row is not None)
        if shard is not None:
            todo = [(sha, path) for sha, path in todo if shards.member(sha, shard)]
        result = StageResult(stage, account, note=model_id if shard is None else f"{model_id}, shard {shard[0] + 1} of {shard[1]}")
        if not todo:
            return result.log()
        shas = [sha for sha, _ in todo]
        storage.ensure_local(data_dir / p for _, p in todo)  # an object-store data dir's pixels
        if len(todo) <= settings.batch_size:
            # one batch (an hourly run's new posts): starting decode workers, a fork server
            # first (6 s here), costs more than decoding it in this process
            settings = replace(settings, workers=0)
        dataset = loader.dataset([data_dir / p for _, p in todo], preprocess, settings)
        if settings.probe_batch and len(todo) > 2 * settings.batch_size:  # else its start will do
            sample = _first_input(dataset, device)
            if sample is not None:
                size = _probe_batch_size(stage, model_id, model_fn, sample, device, settings)
                settings = replace(settings, batch_size=size)
        call = HalveOnOOM(model_fn, settings.batch_size)
        rows: Rows = []
        in_flight: tuple[list[int], Deferred] | None = None

        def land(indices: list[int], collect: Deferred) -> None:
            landed = [{"sha256": shas[i], **row} for i, row in zip(indices, collect(), strict=True)]
            failed = sum(row.get("error") is not None for row in landed)  # a model's own failures
            rows.extend(landed)
            result.done += len(landed) - failed
            result.failed += failed

        try:
            with tqdm(total=len(todo), desc=f"{stage} {account}", unit="img") as bar:
                for indices, batch, failures in loader.batches(dataset, settings, device):
                    previous = in_flight
                    in_flight = (indices, call(batch)) if batch is not None else None
                    if previous is not None:
                        land(*previous)  # the batch before: done, or finishing while this one is queued
                    for i, error in failures:
                        log.warning("%s %s: %s", stage, shas[i], error)
                        result.failed += 1
                        if failed_row is not None:
                            rows.append({"sha256": shas[i], **failed_row(error)})
                    bar.update(len(indices) + len(failures))
                    if len(rows) >= part_rows:
                        tables.write_part(data_dir, table, model_id, rows)
                        rows.clear()
                last, in_flight = in_flight, None
                if last is not None:
                    land(*last)
        except BaseException:
            # keep what is finished, the batch in flight included, so a rerun does only the rest;
            # the error being raised is the one to report, not a failure to keep them
            if in_flight is not None:
                with contextlib.suppress(Exception):
                    land(*in_flight)
            try:
                tables.write_part(data_dir, table, model_id, rows)
            except Exception as e:
                log.error("%s %s: %d finished rows could not be kept: %s", stage, account, len(rows), e)
            raise
        tables.write_part(data_dir, table, model_id, rows)
        if dataset.split is not None:
            result.details["decode_split"] = dataset.split.summary()
        return result.log()
