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
from dataclasses import dataclass, replace
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


def _first_input(dataset: loader.ImageFiles, device: torch.device, view: int = 0) -> torch.Tensor | None:
    """The `view`-th model input of the first image that decodes, or None when none does."""
    for i in range(len(dataset)):
        try:
            decoded = dataset.decode(i)
            inputs = decoded if isinstance(decoded, tuple) else (decoded,)
            return dataset.finish_all(tuple(t.to(device)[None] for t in inputs))[view][0]
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


@dataclass
class Head:
    """One model's part of a pass over stored images: what it computes and where its rows go.

    `model_fn` maps a batch on the device to one row (without sha256) per image, or to a
    function returning them once the device is done. `failed_row(error)`: the row of an
    image that fails to decode (None: it is logged and left pending); `retry_failed` takes
    those rows up again. `settings` (None: the pass's): its batch size, the most images one
    call gets. `preprocess` (None: the pass's): its model's input, when it is not the pass's;
    the pass then makes it from the same decoded image.
    """

    stage: str
    table: tables.Table
    model_id: str
    model_fn: Callable[[torch.Tensor], Rows | Deferred]
    part_rows: int
    failed_row: Callable[[str], dict[str, Any]] | None = None
    retry_failed: bool = False
    settings: loader.LoaderSettings | None = None
    preprocess: Callable | None = None


def same_input(a: Callable, b: Callable) -> bool:
    """Whether two models' preprocessing gives the same tensor from an image (as printed:
    torchvision's transforms list their sizes, interpolation, mean and std)."""
    return repr(a) == repr(b)


def _inputs(heads: list[Head], preprocess: Callable) -> tuple[list[Callable], list[int]]:
    """The distinct inputs the heads' models take (the pass's first) and each head's of them."""
    distinct, which = [preprocess], []
    for head in heads:
        own = head.preprocess or preprocess
        found = next((v for v, p in enumerate(distinct) if same_input(p, own)), None)
        if found is None:
            distinct.append(own)
            found = len(distinct) - 1
        which.append(found)
    return distinct, which


def done_in_embed_pass(stage: str, account: str, model_id: str, in_pass: bool, did: str,
                       pending: Callable[[], int]) -> StageResult | None:
    """The result of a stage whose images the embed stage's pass did (`in_pass`: the run sent
    them there) and that has none left: no model to load for nothing. None: it has work."""
    if in_pass and not pending():
        return StageResult(stage, account, note=f"nothing left: the embed stage {did} in its pass; {model_id}").log()
    return None


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
    """Apply `model_fn` to every pending image in batches, writing a part every `part_rows` rows
    (one `Head`: see `run_heads`)."""
    head = Head(stage, table, model_id, model_fn, part_rows, failed_row, retry_failed)
    return run_heads(data_dir, account, [head], preprocess, device=device, settings=settings, shard=shard)[0].log()


def run_heads(data_dir: Path, account: str, heads: list[Head], preprocess: Callable, *,
              device: torch.device, settings: loader.LoaderSettings,
              shard: shards.Shard | None = None) -> list[StageResult]:
    """One pass over the account's images that any head has pending, each decoded once and
    given to every head that needs it: as `preprocess` makes it, or as the head's own
    preprocess does (made from the same decoded image).

    The rows of a batch are collected only after the next batch is launched, so the device
    always has the next batch queued. An image that fails to decode is each head's
    `failed_row(error)` when given, else logged and left pending (rows a model gives with an
    error count as failed too). When the pass stops on an error, every head's finished rows
    are written first. `shard`: only the pending images of that shard (shards.py), under the
    locks its stage's task holds. Each head's result says how many images the pass decoded
    (`details["decoded"]`) and which stages it shared them with; the caller logs them.
    """
    # embeddings and captions are keyed by content and shared by accounts: one writer per
    # model partition, so two accounts that share an image never both find it pending
    with contextlib.ExitStack() as held:
        if shard is None:
            for head in sorted(heads, key=lambda h: h.table.name):  # one order: no deadlock
                held.enter_context(partition_lock(data_dir, head.table.name, head.model_id))
        wanted: dict[str, tuple[str, list[int]]] = {}  # sha → (path, heads that need it)
        for h, head in enumerate(heads):
            for sha, path in pending(data_dir, head.table, head.model_id, account,
                                     head.retry_failed and head.failed_row is not None):
                if shard is None or shards.member(sha, shard):
                    wanted.setdefault(sha, (path, []))[1].append(h)
        todo = sorted(wanted.items())
        shared = [head.stage for head in heads]
        results = []
        for head in heads:
            others = [s for s in shared if s != head.stage]
            note = (f"each image decoded once for {' and '.join(shared)}; " if others else "") + head.model_id + (
                f", shard {shard[0] + 1} of {shard[1]}" if shard else "")
            results.append(StageResult(head.stage, account, note=note, details={"decoded": 0, "shared_with": others}))
        if not todo:
            return results
        shas = [sha for sha, _ in todo]
        needs = [set(hs) for _, (_, hs) in todo]
        storage.ensure_local(data_dir / path for _, (path, _) in todo)  # an object-store data dir's pixels
        if len(todo) <= settings.batch_size:
            # one batch (an hourly run's new posts): starting decode workers, a fork server
            # first (6 s here), costs more than decoding it in this process
            settings = replace(settings, workers=0)
        distinct, view = _inputs(heads, preprocess)
        dataset = loader.dataset([data_dir / path for _, (path, _) in todo], distinct[0], settings, distinct[1:])
        sizes = [_batch_size(head, dataset, device, settings, len(todo), view[h]) for h, head in enumerate(heads)]
        calls = [HalveOnOOM(head.model_fn, size) for head, size in zip(heads, sizes)]
        settings = replace(settings, batch_size=max(sizes))
        rows: list[Rows] = [[] for _ in heads]
        in_flight: list[tuple[list[int], Deferred] | None] = [None for _ in heads]

        def land(h: int, indices: list[int], collect: Deferred) -> None:
            landed = [{"sha256": shas[i], **row} for i, row in zip(indices, collect(), strict=True)]
            failed = sum(row.get("error") is not None for row in landed)  # a model's own failures
            rows[h].extend(landed)
            results[h].done += len(landed) - failed
            results[h].failed += failed

        def step(h: int, indices: list[int], part: torch.Tensor | None) -> None:
            """Launch head `h` on `part` (the images at `indices`; None: nothing), then collect
            the batch before: done, or finishing while this one is queued."""
            previous = in_flight[h]
            in_flight[h] = (indices, calls[h](part)) if part is not None else None  # raises: it stays
            if previous is not None:
                land(h, *previous)

        left: set[int] = set()  # heads whose model failed as a whole: out of the pass

        def guarded(h: int, indices: list[int], part: torch.Tensor | None) -> None:
            """`step`; a model after the pass's first that fails as a whole (not one image's
            failure: those are its rows) leaves the pass with what it finished. The others go
            on, and its own stage runs it alone later, where its failure is reported as its own."""
            try:
                step(h, indices, part)
            except Exception as e:
                if h == 0:
                    raise
                if in_flight[h] is not None:
                    with contextlib.suppress(Exception):
                        land(h, *in_flight[h])
                in_flight[h] = None
                left.add(h)
                results[h].details["left_pass"] = f"{type(e).__name__}: {e}"
                log.error("%s %s: %s: %s; the pass goes on without it, and the %s stage runs it again on its own",
                          heads[h].stage, account, type(e).__name__, e, heads[h].stage)

        def write(h: int) -> None:
            tables.write_part(data_dir, heads[h].table, heads[h].model_id, rows[h])
            rows[h].clear()

        try:
            label = "+".join(shared)
            started = time.perf_counter()
            with tqdm(total=len(todo), desc=f"{label} {account}", unit="img") as bar:
                for indices, batch, failures in loader.batches(dataset, settings, device):
                    if bar.n == 0:  # the pass's fixed cost: decode workers' start and a first batch
                        for result in results:
                            result.details["first_batch_s"] = time.perf_counter() - started
                    for h in range(len(heads)):
                        if h in left:
                            continue
                        mine = [k for k, i in enumerate(indices) if h in needs[i]]
                        inputs = batch[view[h]] if isinstance(batch, tuple) else batch
                        part = None if batch is None or not mine else inputs if len(mine) == len(indices) \
                            else inputs[mine]
                        guarded(h, [indices[k] for k in mine], part)
                    for i, error in failures:
                        for h in needs[i]:
                            log.warning("%s %s: %s", heads[h].stage, shas[i], error)
                            results[h].failed += 1
                            if heads[h].failed_row is not None:
                                rows[h].append({"sha256": shas[i], **heads[h].failed_row(error)})
                    for result in results:
                        result.details["decoded"] += len(indices) + len(failures)
                    bar.update(len(indices) + len(failures))
                    for h, head in enumerate(heads):
                        if len(rows[h]) >= head.part_rows:
                            write(h)
                for h in range(len(heads)):
                    if h not in left:
                        guarded(h, [], None)  # the last batch in flight
        except BaseException:
            # keep what is finished, the batches in flight included, so a rerun does only the
            # rest; the error being raised is the one to report, not a failure to keep them
            for h in range(len(heads)):
                if in_flight[h] is not None:
                    with contextlib.suppress(Exception):
                        land(h, *in_flight[h])
                try:
                    write(h)
                except Exception as e:
                    log.error("%s %s: %d finished rows could not be kept: %s", heads[h].stage, account,
                              len(rows[h]), e)
            raise
        for h in range(len(heads)):
            write(h)
            if dataset.split is not None:
                results[h].details["decode_split"] = dataset.split.summary()
        return results


def _batch_size(head: Head, dataset: loader.ImageFiles, device: torch.device,
                settings: loader.LoaderSettings, images: int, view: int) -> int:
    """The most images one call of the head's model gets: its own setting (probed on CUDA)."""
    own = head.settings or settings
    if own.probe_batch and images > 2 * own.batch_size:  # else its start will do
        sample = _first_input(dataset, device, view)
        if sample is not None:
            return _probe_batch_size(head.stage, head.model_id, head.model_fn, sample, device, own)
    return own.batch_size
