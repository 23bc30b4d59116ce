"""The shared loop of the model stages: stored images → batches → model → Parquet parts.

Work is keyed by image content: the to-do list is every downloaded sha256 of
the account minus those already in the model's partition (an anti-join), so
a rerun does only what is left and a repost is processed once. Images are
decoded while the model runs (pipeline.loader); batches that do not fit in GPU
memory are split in half until they do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline import loader, storage, tables
from pipeline.lock import partition_lock
from pipeline.stages import StageResult

log = logging.getLogger("clipgram.inference")

Rows = list[dict[str, Any]]
Deferred = Callable[[], Rows]  # rows still being computed on the device: calling waits for them


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
            except torch.cuda.OutOfMemoryError:
                if self.limit == 1:
                    raise
                torch.cuda.empty_cache()
                self.limit //= 2
                log.warning("CUDA out of memory: batch size lowered to %d", self.limit)
                continue
            start += len(chunk)
        return lambda: [row for part in parts for row in (part() if callable(part) else part)]


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
) -> StageResult:
    """Apply `model_fn` to every pending image in batches, writing a part every `part_rows` rows.

    `model_fn` maps a batch on `device` to one row (without sha256) per image, or to a
    function returning them once the device is done: the rows are then collected only
    after the next batch is launched, so the device always has the next batch queued.
    An image that fails to decode is written as `failed_row(error)` when given,
    else logged and left pending; `retry_failed` takes those failed rows up again.
    """
    # embeddings and captions are keyed by content and shared by accounts: one writer per
    # model partition, so two accounts that share an image never both find it pending
    with partition_lock(data_dir, table.name, model_id):
        todo = pending(data_dir, table, model_id, account, retry_failed and failed_row is not None)
        result = StageResult(stage, account, note=model_id)
        if not todo:
            return result.log()
        shas = [sha for sha, _ in todo]
        storage.ensure_local(data_dir / p for _, p in todo)  # an object-store data dir's pixels
        dataset = loader.dataset([data_dir / p for _, p in todo], preprocess, settings)
        call = HalveOnOOM(model_fn, settings.batch_size)
        rows: Rows = []
        in_flight: tuple[list[int], Deferred] | None = None

        def land(indices: list[int], collect: Deferred) -> None:
            rows.extend({"sha256": shas[i], **row} for i, row in zip(indices, collect(), strict=True))
            result.done += len(indices)

        with tqdm(total=len(todo), desc=f"{stage} {account}", unit="img") as bar:
            for indices, batch, failures in loader.batches(dataset, settings, device):
                launched = (indices, call(batch)) if batch is not None else None
                if in_flight is not None:
                    land(*in_flight)  # the batch before: done, or finishing while this one is queued
                in_flight = launched
                for i, error in failures:
                    log.warning("%s %s: %s", stage, shas[i], error)
                    result.failed += 1
                    if failed_row is not None:
                        rows.append({"sha256": shas[i], **failed_row(error)})
                bar.update(len(indices) + len(failures))
                if len(rows) >= part_rows:
                    tables.write_part(data_dir, table, model_id, rows)
                    rows.clear()
            if in_flight is not None:
                land(*in_flight)
        tables.write_part(data_dir, table, model_id, rows)
        if dataset.split is not None:
            result.details["decode_split"] = dataset.split.summary()
        return result.log()
