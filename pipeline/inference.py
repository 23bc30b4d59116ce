"""The shared loop of the model stages: stored images → batches → model → Parquet parts.

Work is keyed by image content: the to-do list is every downloaded sha256 of
the account minus those already in the model's partition (an anti-join), so
a rerun does only what is left and a repost is processed once.

Throughput: DataLoader workers (one torch thread each) decode and preprocess
while the model runs. A JPEG is decoded straight at the smallest libjpeg scale
(1/2, 1/4, 1/8) whose shorter side stays at least `decode.draft_factor` times the
model's input size, so a 1080 px photo for a 224 px model costs a half-size decode
and a small resize instead of a full one and a big resize. On CUDA, JPEGs are
instead read raw by the workers and decoded + resized on the GPU (nvjpeg), since
at thousands of images a second CPU decoding cannot keep up. Batches that do not
fit in GPU memory are split in half until they do.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from tqdm import tqdm

from pipeline import images, storage, tables
from pipeline.lock import partition_lock
from pipeline.stages import StageResult

log = logging.getLogger("clipgram.inference")

JPEG_SUFFIXES = (".jpg", ".jpeg")
_CONVERSIONS = {"ToTensor", "MaybeToTensor", "MaybeConvertMode"}


@dataclass(frozen=True)
class LoaderSettings:
    batch_size: int
    workers: int
    gpu_decode: bool
    max_pixels: int = 89_478_485
    draft_factor: float = 0.0           # 0: JPEGs decoded at full size (see draft_side)


def loader_settings(cfg: Any, stage: str, device: torch.device) -> LoaderSettings:
    """Resolve the "auto" values of [decode] and [<stage>] batch_size for `device`."""
    gpu = device.type == "cuda"
    batch = getattr(cfg, stage).batch_size
    if batch == "auto":
        batch = {"embed": 256, "caption": 64}[stage] if gpu else {"embed": 32, "caption": 8}[stage]
    workers = cfg.decode.workers
    if workers == "auto":
        workers = max(1, min(8, (os.cpu_count() or 2) - 1))
    # true forces torchvision's decoder on any device (on the CPU: libjpeg-turbo, no Pillow)
    gpu_decode = gpu if cfg.decode.gpu == "auto" else bool(cfg.decode.gpu)
    return LoaderSettings(batch, workers, gpu_decode, cfg.download.max_image_pixels,
                          cfg.decode.draft_factor)


def draft_side(preprocess: Callable, factor: float) -> int | None:
    """The shorter side a JPEG may be scaled down to while decoding, ahead of `preprocess`.

    `factor` times the size of the Resize that `preprocess` starts with: the resize
    then still works from at least `factor`× its output, so it sees nearly the pixels
    a full decode gives (draft_factor in configs/default.toml). None (decode in full)
    when `factor` is 0 or the transform does not start with a Resize.
    """
    steps = getattr(preprocess, "transforms", [])
    if factor <= 0 or not steps or not isinstance(steps[0], T.Resize):
        return None
    size = steps[0].size
    # an int (or one number) sizes the shorter side; (h, w) squashes: the larger one bounds both
    target = size if isinstance(size, int) else max(size)
    return math.ceil(factor * target)


def gpu_preprocess(preprocess: Callable) -> Callable[[list[torch.Tensor]], torch.Tensor] | None:
    """open_clip's CPU transform, mirrored on uint8 CHW tensors already on the GPU.

    None when the transform holds a step this cannot mirror (images then decode on the CPU).
    """
    steps, normalize = [], None
    for t in getattr(preprocess, "transforms", []):
        if isinstance(t, (T.Resize, T.CenterCrop)):
            steps.append(t)
        elif isinstance(t, T.Normalize):
            normalize = t
        elif type(t).__name__ in _CONVERSIONS or getattr(t, "__name__", "") == "_convert_to_rgb":
            continue  # mode / tensor conversions: decode_jpeg already gives RGB tensors
        else:
            return None
    if normalize is None:
        return None

    def apply(decoded: list[torch.Tensor]) -> torch.Tensor:
        # images of one size (most of a feed: 1080×1080) are resized in one call
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(decoded):
            by_shape.setdefault(tuple(img.shape), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(decoded)
        for members in by_shape.values():
            x = torch.stack([decoded[i] for i in members]).float()
            for step in steps:
                x = step(x)
            for i, row in zip(members, x):
                out[i] = row
        # PIL rounds and clips to 8 bits after resizing: do the same for parity
        batch = torch.stack(out).round_().clamp_(0, 255).div_(255)
        return normalize(batch)

    return apply


class ImageFiles(Dataset):
    """Each item: (index, preprocessed tensor | raw JPEG bytes, error). Errors never raise."""

    def __init__(self, paths: Sequence[Path], preprocess: Callable, max_pixels: int, raw_jpeg: bool,
                 min_side: int | None = None):
        self.paths, self.preprocess, self.max_pixels = paths, preprocess, max_pixels
        self.raw_jpeg, self.min_side = raw_jpeg, min_side  # min_side: see images.load_rgb

    def __len__(self) -> int:
        return len(self.paths)

    def decode(self, i: int) -> torch.Tensor:
        return self.preprocess(images.load_rgb(self.paths[i], self.max_pixels, self.min_side))

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            if self.raw_jpeg and self.paths[i].suffix.lower() in JPEG_SUFFIXES:
                # verified when downloaded (decompression-bomb guard included)
                return i, torchvision.io.read_file(str(self.paths[i])), None
            return i, self.decode(i), None
        except (images.BadImage, OSError, RuntimeError) as e:
            return i, None, str(e)


@dataclass
class _Batch:
    """A batch as few tensors: each tensor a worker sends costs a file descriptor."""

    ready_idx: list[int]
    ready: torch.Tensor | None          # preprocessed images, stacked
    raw_idx: list[int]
    raw: torch.Tensor | None            # JPEG files' bytes, end to end
    raw_ends: list[int]
    failures: list[tuple[int, str]]

    def jpegs(self) -> list[torch.Tensor]:
        starts = [0, *self.raw_ends[:-1]]
        return [self.raw[a:b] for a, b in zip(starts, self.raw_ends)]


def _collate(items: list) -> _Batch:
    ready = [(i, t) for i, t, err in items if err is None and t.dtype != torch.uint8]
    raw = [(i, t) for i, t, err in items if err is None and t.dtype == torch.uint8]
    return _Batch(
        [i for i, _ in ready], torch.stack([t for _, t in ready]) if ready else None,
        [i for i, _ in raw], torch.cat([t for _, t in raw]) if raw else None,
        torch.tensor([len(t) for _, t in raw], dtype=torch.long).cumsum(0).tolist(),
        [(i, err) for i, _, err in items if err is not None])


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # N workers × all cores' threads would starve the model


def _worker_context() -> multiprocessing.context.BaseContext:
    """Where decode workers come from: a fork server, with this module (and torch) preloaded.

    Plain fork copies the caller's atexit hooks: under Prefect, its log and event
    services' hooks then fail in every worker at exit (exit code 1), and a
    forked process never holds the threads those hooks expect. open_clip is
    preloaded too: unpickling its transforms imports it, seconds that every
    worker of every stage run would otherwise spend before its first image.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "open_clip"])
    return context


def batches(dataset: ImageFiles, settings: LoaderSettings, device: torch.device):
    """Yield (indices, batch on `device`, failures) for the whole dataset."""
    to_gpu = gpu_preprocess(dataset.preprocess) if dataset.raw_jpeg else None
    loader = DataLoader(
        dataset, batch_size=settings.batch_size, num_workers=settings.workers,
        collate_fn=_collate, worker_init_fn=_one_thread if settings.workers else None,
        prefetch_factor=4 if settings.workers else None, persistent_workers=False,
        multiprocessing_context=_worker_context() if settings.workers else None)
    for b in loader:
        failures, parts, indices = list(b.failures), [], list(b.ready_idx)
        if b.ready is not None:
            cpu = b.ready.pin_memory() if device.type == "cuda" else b.ready  # async copy
            parts.append(cpu.to(device, non_blocking=True))
        if b.raw is not None:
            try:
                decoded = torchvision.io.decode_jpeg(
                    b.jpegs(), mode=torchvision.io.ImageReadMode.RGB, device=device,
                    apply_exif_orientation=True)
                parts.append(to_gpu(decoded))
                indices.extend(b.raw_idx)
            except RuntimeError as e:  # one odd JPEG fails the whole batch: retry one by one on the CPU
                log.debug("JPEG batch decode failed (%s); decoding this batch with Pillow", e)
                for i in b.raw_idx:
                    try:
                        parts.append(dataset.decode(i).unsqueeze(0).to(device))
                        indices.append(i)
                    except (images.BadImage, OSError) as err:
                        failures.append((i, str(err)))
        yield indices, torch.cat(parts) if parts else None, failures


class HalveOnOOM:
    """Call `fn` on the batch in chunks, halving the chunk size whenever CUDA runs out of memory."""

    def __init__(self, fn: Callable[[torch.Tensor], list], limit: int):
        self.fn, self.limit = fn, limit

    def __call__(self, batch: torch.Tensor) -> list:
        out: list = []
        start = 0
        while start < len(batch):
            chunk = batch[start:start + self.limit]
            try:
                out.extend(self.fn(chunk))
            except torch.cuda.OutOfMemoryError:
                if self.limit == 1:
                    raise
                torch.cuda.empty_cache()
                self.limit //= 2
                log.warning("CUDA out of memory: batch size lowered to %d", self.limit)
                continue
            start += len(chunk)
        return out


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
    device: torch.device,
    settings: LoaderSettings,
    part_rows: int,
    failed_row: Callable[[str], dict[str, Any]] | None = None,
) -> StageResult:
    """Apply `model_fn` to every pending image in batches, writing a part every `part_rows` rows.

    `model_fn` maps a batch on `device` to one row (without sha256) per image.
    An image that fails to decode is written as `failed_row(error)` when given,
    else logged and left pending.
    """
    # embeddings and captions are keyed by content and shared by accounts: one writer per
    # model partition, so two accounts that share an image never both find it pending
    with partition_lock(data_dir, table.name, model_id):
        todo = pending(data_dir, table, model_id, account)
        result = StageResult(stage, account, note=model_id)
        if not todo:
            return result.log()
        shas = [sha for sha, _ in todo]
        storage.ensure_local(data_dir / p for _, p in todo)  # an object-store data dir's pixels
        dataset = ImageFiles([data_dir / p for _, p in todo], preprocess, settings.max_pixels,
                             raw_jpeg=settings.gpu_decode and gpu_preprocess(preprocess) is not None,
                             min_side=draft_side(preprocess, settings.draft_factor))
        call = HalveOnOOM(model_fn, settings.batch_size)
        rows: list[dict[str, Any]] = []
        with tqdm(total=len(todo), desc=f"{stage} {account}", unit="img") as bar:
            for indices, batch, failures in batches(dataset, settings, device):
                if batch is not None:
                    rows.extend({"sha256": shas[i], **row} for i, row in zip(indices, call(batch)))
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
