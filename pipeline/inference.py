"""The shared loop of the model stages: stored images → batches → model → Parquet parts.

Work is keyed by image content: the to-do list is every downloaded sha256 of
the account minus those already in the model's partition (an anti-join), so
a rerun does only what is left and a repost is processed once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline import images, tables
from pipeline.stages import StageResult

log = logging.getLogger("clipgram.inference")


class ImageFiles(Dataset):
    """Decodes and preprocesses stored images; a file that fails becomes an error string."""

    def __init__(self, paths: Sequence[Path], preprocess: Callable, max_pixels: int):
        self.paths, self.preprocess, self.max_pixels = paths, preprocess, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, self.preprocess(images.load_rgb(self.paths[i], self.max_pixels)), None
        except (images.BadImage, OSError) as e:
            return i, None, str(e)


def _collate(items: list) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    good = [(i, t) for i, t, err in items if err is None]
    failed = [(i, err) for i, _, err in items if err is not None]
    tensor = torch.stack([t for _, t in good]) if good else None
    return [i for i, _ in good], tensor, failed


def pending(data_dir: Path, table: tables.Table, model_id: str, account: str) -> list[tuple[str, str]]:
    """(sha256, path) of the account's downloaded images missing from `table`'s model partition."""
    con = tables.connect(data_dir)
    done = tables.scan_sql(table, data_dir, str(data_dir), model_id)
    return con.execute(
        f"""SELECT sha256, min(path) FROM media
            WHERE account = ? AND status = 'done'
              AND sha256 NOT IN (SELECT sha256 FROM ({done}))
            GROUP BY sha256 ORDER BY sha256""", [account]).fetchall()


def run(
    data_dir: Path,
    stage: str,
    account: str,
    table: tables.Table,
    model_id: str,
    preprocess: Callable,
    model_fn: Callable[[torch.Tensor], list[dict[str, Any]]],
    *,
    batch_size: int,
    num_workers: int,
    part_rows: int,
    max_pixels: int = 89_478_485,
    failed_row: Callable[[str], dict[str, Any]] | None = None,
) -> StageResult:
    """Apply `model_fn` to every pending image in batches, writing a part every `part_rows` rows.

    `model_fn` maps a batch tensor to one row (without sha256) per image. An
    image that fails to decode is written as `failed_row(error)` when given,
    else logged and left pending.
    """
    todo = pending(data_dir, table, model_id, account)
    result = StageResult(stage, account, note=model_id)
    if not todo:
        return result.log()
    shas = [sha for sha, _ in todo]
    dataset = ImageFiles([data_dir / p for _, p in todo], preprocess, max_pixels)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate, pin_memory=torch.cuda.is_available())
    rows: list[dict[str, Any]] = []
    with tqdm(total=len(todo), desc=f"{stage} {account}", unit="img") as bar:
        for indices, tensor, failures in loader:
            if tensor is not None:
                for i, row in zip(indices, model_fn(tensor)):
                    rows.append({"sha256": shas[i], **row})
                result.done += len(indices)
            for i, error in failures:
                log.warning("%s %s: %s", stage, shas[i], error)
                result.failed += 1
                if failed_row is not None:
                    rows.append({"sha256": shas[i], **failed_row(error)})
            bar.update(len(indices) + len(failures))
            if len(rows) >= part_rows:
                tables.write_part(data_dir, table, model_id, rows)
                rows = []
    tables.write_part(data_dir, table, model_id, rows)
    return result.log()
