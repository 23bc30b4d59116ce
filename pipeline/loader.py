"""Stored images → preprocessed batches on the model's device, decoded while the model runs.

Two decoders share the JPEGs of a stage run:

- DataLoader workers (one torch thread each) decode with Pillow at the smallest
  libjpeg scale (1/2, 1/4, 1/8, done in the DCT domain) whose shorter side stays
  at least `decode.draft_factor` times the model's input size, then resize and crop;
- on CUDA, the main process decodes the rest with nvjpeg
  (torchvision.io.decode_jpeg on the device) and resizes them there.

At thousands of images a second neither keeps up alone, and which one is faster
depends on the host (cores, the GPU's hardware JPEG engines). A `Split` measures
both while the run goes and keeps handing each the share of JPEGs that makes
them take equally long (`balance`).

Both halves hand over uint8 crops and normalisation happens on the device: a
224 px image crosses process and PCIe boundaries as 150 KB instead of 600 KB.
"""

from __future__ import annotations

import io
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from clipgram import images
from clipgram.config import Config

log = logging.getLogger("clipgram.loader")

JPEG_SUFFIXES = (".jpg", ".jpeg")
_CONVERSIONS = {"ToTensor", "MaybeToTensor", "MaybeConvertMode"}
GOLDEN = (math.sqrt(5) - 1) / 2  # spreads the device's share evenly over any run of indices


@dataclass(frozen=True)
class LoaderSettings:
    batch_size: int
    workers: int
    gpu_decode: bool
    max_pixels: int = 89_478_485
    draft_factor: float = 0.0           # 0: JPEGs decoded at full size (see draft_side)
    gpu_share: float | None = None      # the device decoder's share of JPEGs; None: balanced
    probe_batch: int = 0                # > 0: batch_size is where a search for the best size
                                        # starts, and this is the largest it may try (auto on CUDA)


# `auto` batch sizes: on the CPU a fixed one; on CUDA the probe's (start, largest it tries).
# Past these sizes a batch gains no speed on any GPU we know, and the workers' prefetched
# batches (workers × prefetch_factor × batch × 150 KB of shared memory) only grow.
AUTO_BATCH = {"embed": {"cpu": 32, "cuda": (64, 1024)}, "caption": {"cpu": 32, "cuda": (16, 512)}}


def loader_settings(cfg: Config, stage: str, device: torch.device) -> LoaderSettings:
    """Resolve the "auto" values of [decode] and [<stage>] batch_size for `device`."""
    gpu = device.type == "cuda"
    batch, probe = getattr(cfg, stage).batch_size, 0
    if batch == "auto":
        batch, probe = AUTO_BATCH[stage]["cuda"] if gpu else (AUTO_BATCH[stage]["cpu"], 0)
    workers = cfg.decode.workers
    if workers == "auto":
        cores = os.cpu_count() or 2
        # on a GPU the main process only feeds it (and a pinning thread runs beside it): the
        # other cores all decode. On the CPU the model needs the cores: a few workers suffice.
        workers = max(1, min(32, cores - 2)) if gpu else max(1, min(8, cores - 1))
    # true forces torchvision's decoder on any device (on the CPU: libjpeg-turbo, no Pillow)
    gpu_decode = gpu if cfg.decode.gpu == "auto" else bool(cfg.decode.gpu)
    share = None if cfg.decode.gpu_share == "auto" else cfg.decode.gpu_share
    return LoaderSettings(batch, workers, gpu_decode, cfg.download.max_image_pixels,
                          cfg.decode.draft_factor, share, probe)


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


_NORMALIZE_STATS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (mean, std, device) → tensors


@dataclass(frozen=True)
class Transform:
    """open_clip's preprocess in two halves: the geometry (Resize, CenterCrop), which runs
    wherever the image was decoded and gives uint8 crops, and the normalisation, on the device."""

    geometry: tuple[Callable, ...]
    normalize: T.Normalize

    @classmethod
    def of(cls, preprocess: Callable) -> Transform | None:
        """None when `preprocess` holds a step this cannot mirror: workers then run it whole."""
        geometry, normalize, converted = [], None, False
        for t in getattr(preprocess, "transforms", []):
            if isinstance(t, (T.Resize, T.CenterCrop)) and not converted:
                geometry.append(t)
            elif isinstance(t, T.Normalize) and normalize is None:
                normalize = t
            elif type(t).__name__ in _CONVERSIONS or getattr(t, "__name__", "") == "_convert_to_rgb":
                converted = True  # images reach this already RGB; ToTensor's ÷255 is in `finish`
            else:
                return None
        return cls(tuple(geometry), normalize) if normalize is not None else None

    def crop(self, image: Any) -> torch.Tensor:
        """A PIL image → the uint8 CHW crop the model sees (before normalisation)."""
        for step in self.geometry:
            image = step(image)
        return T.functional.pil_to_tensor(image)

    def crop_decoded(self, decoded: list[torch.Tensor]) -> torch.Tensor:
        """uint8 CHW tensors (any size, on any device) → their crops, stacked, as `crop` gives them."""
        # images of one size (most of a feed: 1080×1080) are resized in one call
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(decoded):
            by_shape.setdefault(tuple(img.shape), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(decoded)
        for members in by_shape.values():
            x = torch.stack([decoded[i] for i in members]).float()
            for step in self.geometry:
                x = step(x)
            # PIL rounds and clips to 8 bits after resizing: do the same for parity
            x = x.round_().clamp_(0, 255).to(torch.uint8)
            for i, row in zip(members, x):
                out[i] = row
        return torch.stack(out)

    def finish(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 crops → the float tensor open_clip's transform gives (ToTensor, Normalize).

        The same operations as T.Normalize, with its mean and std kept on the device:
        T.Normalize copies them there from Python lists on every call, and checks std
        for zeros, each a wait for the device to finish the batch before.
        """
        key = (tuple(self.normalize.mean), tuple(self.normalize.std), str(crops.device))
        if key not in _NORMALIZE_STATS:
            _NORMALIZE_STATS[key] = tuple(torch.tensor(values, dtype=torch.float32, device=crops.device)
                                          .view(-1, 1, 1) for values in key[:2])
        mean, std = _NORMALIZE_STATS[key]
        return crops.float().div_(255).sub_(mean).div_(std)


class Split:
    """Which JPEGs the device decodes: a share in shared memory, read by the workers per image.

    Fixed (`decode.gpu_share`), or balanced: after every batch, the measured cost of
    each side (a worker's seconds per image, the main process's seconds per image it
    decodes on the device and per image for everything else) sets the share anew.
    Costs are averaged over recent batches, so one slow batch does not swing it.
    """

    DECAY = 0.8
    BOUNDS = (0.02, 0.98)  # a balanced share keeps measuring both sides

    def __init__(self, share: float | None, workers: int,
                 context: multiprocessing.context.BaseContext | None = None):
        self.balanced = share is None and workers > 0  # no workers: nothing to balance against
        # with no workers the main process decodes everything anyway: the device decoder is faster
        initial = share if share is not None else 0.5 if workers else 1.0
        self._value = (context or multiprocessing).RawValue("d", initial)
        self.workers = workers
        self._costs: dict[str, list[float]] = {}  # side → [decayed seconds, decayed images]
        self.decoded = {"worker": 0, "device": 0}  # images, over the whole run
        self._batches = 0

    @property
    def share(self) -> float:
        return self._value.value

    def on_device(self, index: int) -> bool:
        return (index * GOLDEN) % 1.0 < self._value.value

    def observe(self, worker: tuple[float, int], device: tuple[float, int], main: tuple[float, int]) -> None:
        """One batch's (seconds, images) per side; rebalance when every side has been seen.

        The first batch's costs are left out: they hold one-off start-up (nvjpeg's
        decoder, cuDNN's algorithm search, torch.compile), not the steady rates.
        """
        self.decoded["worker"] += worker[1]
        self.decoded["device"] += device[1]
        self._batches += 1
        if self._batches == 1:
            return
        for side, (seconds, count) in (("worker", worker), ("device", device), ("main", main)):
            total = self._costs.setdefault(side, [0.0, 0.0])
            total[0] = total[0] * self.DECAY + seconds
            total[1] = total[1] * self.DECAY + count
        costs = self.costs()
        if self.balanced and len(costs) == 3:
            low, high = self.BOUNDS
            self._value.value = min(high, max(low, balance(costs["worker"], self.workers,
                                                           costs["device"], costs["main"])))

    def costs(self) -> dict[str, float]:
        """Seconds per image of each side seen so far."""
        return {side: s / n for side, (s, n) in self._costs.items() if n > 0}

    def summary(self) -> dict[str, float | None]:
        """The share and each side's rate (images/s), for logs and the bench."""
        costs = self.costs()

        def rate(side: str, scale: int = 1) -> float | None:
            return scale / costs[side] if costs.get(side) else None
        decoded = sum(self.decoded.values())
        return {"gpu_share": self.share, "decoded_on_device": self.decoded["device"] / decoded if decoded else None,
                "workers_ips": rate("worker", self.workers), "device_decode_ips": rate("device"),
                "main_ips": rate("main")}

    def describe(self) -> str:
        def ips(value: float | None) -> str:
            return f"{value:,.0f} img/s" if value is not None else "unmeasured"
        s = self.summary()
        return (f"the device decoded {s['decoded_on_device'] or 0:.0%} of the images (share now "
                f"{s['gpu_share']:.0%}); workers {ips(s['workers_ips'])}, device decoder "
                f"{ips(s['device_decode_ips'])}, model and writes {ips(s['main_ips'])}")


def balance(worker_s: float, workers: int, device_s: float, main_s: float) -> float:
    """The device's share of JPEGs that makes the workers and the main process take equally long.

    Per image of the run, the workers together take (1 - share) × worker_s / workers
    and the main process share × device_s + main_s (main_s: the model and the writes,
    which it does whoever decodes). Equal when share = (worker_s / workers - main_s) /
    (worker_s / workers + device_s), clipped to [0, 1]: 0 when the main process is
    the bottleneck even with no decoding at all.
    """
    per_image = worker_s / max(workers, 1)
    if per_image + device_s <= 0:
        return 0.5
    return min(1.0, max(0.0, (per_image - main_s) / (per_image + device_s)))


class ImageFiles(Dataset):
    """Each item: (index, uint8 crop | preprocessed tensor | raw JPEG bytes, error, decode seconds).

    Errors never raise. JPEGs the split gives the device are read, not decoded.
    """

    def __init__(self, paths: Sequence[Path], preprocess: Callable, max_pixels: int,
                 split: Split | None = None, min_side: int | None = None, also: Sequence[Callable] = ()):
        self.paths, self.preprocess, self.max_pixels = paths, preprocess, max_pixels
        self.transform = Transform.of(preprocess)
        self.also = tuple(also)
        # the device decoder gives one model's crops: with other inputs to make, workers decode all
        self.split = split if self.transform is not None and not self.also else None
        self.min_side = min_side  # see images.load_rgb

    def __len__(self) -> int:
        return len(self.paths)

    def decode(self, i: int) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Image `i` as the model's input before `finish`: a uint8 crop (else preprocessed floats);
        with `also`, a tuple: that, then each other model's input, from one decode."""
        image = images.load_rgb(self.paths[i], self.max_pixels, self.min_side)
        first = self.transform.crop(image) if self.transform else self.preprocess(image)
        return (first, *(preprocess(image) for preprocess in self.also)) if self.also else first

    def finish(self, batch: torch.Tensor) -> torch.Tensor:
        # uint8 crops are normalised here; a preprocess of its own (OCR's) gives the model's input
        return self.transform.finish(batch) if self.transform and batch.dtype == torch.uint8 else batch

    def finish_all(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Each model's batch from `decode`'s tuples, stacked: the first finished, `also`'s as made."""
        return (self.finish(inputs[0]), *inputs[1:])

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None, float]:
        start = time.perf_counter()
        try:
            if self.split and self.paths[i].suffix.lower() in JPEG_SUFFIXES and self.split.on_device(i):
                # verified when downloaded (decompression-bomb guard included)
                data = torchvision.io.read_file(str(self.paths[i]))
                if images.exif_orientation(io.BytesIO(data.numpy())) == 1:  # nvjpeg does not rotate
                    return i, data, None, 0.0
            return i, self.decode(i), None, time.perf_counter() - start
        except Exception as e:  # one file's failure, whatever its decoder raised
            return i, None, str(e) if isinstance(e, images.BadImage) else images.reason(e), \
                time.perf_counter() - start


@dataclass
class _Batch:
    """A batch as few tensors: each tensor a worker sends costs a file descriptor."""

    ready_idx: list[int]
    ready: torch.Tensor | tuple[torch.Tensor, ...] | None  # decoded images (uint8 crops, or
                                                           # preprocessed), stacked; one per input
    raw_idx: list[int]
    raw: torch.Tensor | None            # JPEG files' bytes, end to end
    raw_ends: list[int]
    failures: list[tuple[int, str]]
    worker_seconds: float               # spent decoding the ready images

    def jpegs(self) -> list[torch.Tensor]:
        starts = [0, *self.raw_ends[:-1]]
        return [self.raw[a:b] for a, b in zip(starts, self.raw_ends)]

    def pin_memory(self) -> _Batch:
        """Called by the DataLoader's pinning thread: the decoded images then copy asynchronously."""
        if isinstance(self.ready, tuple):
            self.ready = tuple(inputs.pin_memory() for inputs in self.ready)
        elif self.ready is not None:
            self.ready = self.ready.pin_memory()
        return self


def stack(decoded: list[torch.Tensor | tuple[torch.Tensor, ...]]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """One batch of a model's inputs (one per model, for tuples). Inputs of their own sizes
    (OCR's) are zero-padded at the bottom and right to the batch's largest."""
    if isinstance(decoded[0], tuple):  # several models' inputs: one stack each
        return tuple(stack(list(inputs)) for inputs in zip(*decoded))
    if len({t.shape for t in decoded}) == 1:
        return torch.stack(decoded)
    height, width = max(t.shape[-2] for t in decoded), max(t.shape[-1] for t in decoded)
    out = decoded[0].new_zeros((len(decoded), *decoded[0].shape[:-2], height, width))
    for i, t in enumerate(decoded):
        out[i, ..., :t.shape[-2], :t.shape[-1]] = t
    return out


def _collate(items: list) -> _Batch:
    ready = [(i, t) for i, t, err, _ in items if err is None and (isinstance(t, tuple) or t.dim() > 1)]
    raw = [(i, t) for i, t, err, _ in items if err is None and not isinstance(t, tuple) and t.dim() == 1]
    return _Batch(
        [i for i, _ in ready], stack([t for _, t in ready]) if ready else None,
        [i for i, _ in raw], torch.cat([t for _, t in raw]) if raw else None,
        torch.tensor([len(t) for _, t in raw], dtype=torch.long).cumsum(0).tolist(),
        [(i, err) for i, _, err, _ in items if err is not None],
        sum(seconds for *_, seconds in items))


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # N workers × all cores' threads would starve the model


def worker_context() -> multiprocessing.context.BaseContext:
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


def dataset(paths: Sequence[Path], preprocess: Callable, settings: LoaderSettings,
            also: Sequence[Callable] = ()) -> ImageFiles:
    """The stage's images, split between the workers and the device decoder as `settings` say.

    `also`: other models' preprocessing, applied to the same decoded image: `batches` then
    yields a tuple of inputs, `preprocess`'s first. The image is decoded large enough for all.
    """
    split = None
    if settings.gpu_decode and not also:
        split = Split(settings.gpu_share, settings.workers,
                      worker_context() if settings.workers else None)
    sides = [draft_side(p, settings.draft_factor) for p in (preprocess, *also)]
    return ImageFiles(paths, preprocess, settings.max_pixels, split,
                      None if None in sides else max(sides), also)


PREFETCH_IMAGES = 8192  # decoded images waiting in shared memory, at most (2 batches per worker aside)


def prefetch_factor(settings: LoaderSettings) -> int:
    """Batches each worker decodes ahead: 4, fewer when batches are large (a 224 px crop is
    150 KB of shared memory, and CUDA's auto batch size may reach 1,024), never under 2."""
    return max(2, min(4, PREFETCH_IMAGES // max(1, settings.workers * settings.batch_size)))


def batches(dataset: ImageFiles, settings: LoaderSettings, device: torch.device
            ) -> Iterator[tuple[list[int], torch.Tensor | tuple[torch.Tensor, ...] | None, list[tuple[int, str]]]]:
    """Yield (indices, batch on `device`, failures) for the whole dataset; the batch is a tuple
    of inputs, one per model, when the dataset has `also`."""
    cuda = device.type == "cuda"
    loader = DataLoader(
        dataset, batch_size=settings.batch_size, num_workers=settings.workers,
        collate_fn=_collate, worker_init_fn=_one_thread if settings.workers else None,
        prefetch_factor=prefetch_factor(settings) if settings.workers else None, persistent_workers=False,
        pin_memory=cuda, multiprocessing_context=worker_context() if settings.workers else None)
    split = dataset.split
    for b in loader:
        start = time.perf_counter()
        failures, parts, indices = list(b.failures), [], list(b.ready_idx)
        if isinstance(b.ready, tuple):  # several models' inputs (no device decoding then)
            inputs = [t.to(device, non_blocking=True) for t in b.ready]
            yield indices, dataset.finish_all(tuple(inputs)), failures
            continue
        if b.ready is not None:
            parts.append(b.ready.to(device, non_blocking=True))
        device_seconds = 0.0
        if b.raw is not None:
            crops = _decode_on_device(dataset, b, device, indices, failures)
            parts.extend([crops] if crops is not None else [])
            device_seconds = time.perf_counter() - start
        yield indices, dataset.finish(torch.cat(parts)) if parts else None, failures
        if split is not None:  # what the caller did with the batch counts as the main process's work
            main_seconds = time.perf_counter() - start - device_seconds
            split.observe((b.worker_seconds, len(b.ready_idx)), (device_seconds, len(b.raw_idx)),
                          (main_seconds, len(b.ready_idx) + len(b.raw_idx)))
    if split is not None:
        log.info("decode: %s", split.describe())


def _decode_on_device(dataset: ImageFiles, b: _Batch, device: torch.device, indices: list[int],
                      failures: list[tuple[int, str]]) -> torch.Tensor | None:
    """The batch's raw JPEGs → uint8 crops on `device`, appending their indices (or failures)."""
    try:
        with _decoder_stream(device) as ready:
            # EXIF orientation: torchvision applies it on the CPU only; such JPEGs never get here
            decoded = torchvision.io.decode_jpeg(b.jpegs(), mode=torchvision.io.ImageReadMode.RGB,
                                                 device=device)
            crops = ready(dataset.transform.crop_decoded(decoded))
        indices.extend(b.raw_idx)
        return crops
    except RuntimeError as e:  # one odd JPEG fails the whole batch: retry one by one with Pillow
        log.debug("JPEG batch decode failed (%s); decoding this batch with Pillow", e)
        crops = []
        for i in b.raw_idx:
            try:
                crops.append(dataset.decode(i))
                indices.append(i)
            except Exception as err:  # one file's failure, whatever its decoder raised
                failures.append((i, str(err) if isinstance(err, images.BadImage) else images.reason(err)))
        return torch.stack(crops).to(device) if crops else None


_SIDE_STREAMS: dict[torch.device, Any] = {}


@contextmanager
def _decoder_stream(device: torch.device) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """Run the device decode on a stream of its own; yields a function that hands a result
    over to the model's stream.

    nvjpeg writes on its own stream into memory allocated on the current one. With the
    previous batch's forward still queued there, memory that forward has yet to read could
    be handed to nvjpeg. A side stream has its own pool, and waiting for its last batch
    (short: a decode and a resize) makes everything it freed safe to reuse.
    """
    if device.type != "cuda":
        yield lambda tensor: tensor
        return
    side = _SIDE_STREAMS.setdefault(device, torch.cuda.Stream(device))
    side.synchronize()
    model_stream = torch.cuda.current_stream(device)

    def hand_over(tensor: torch.Tensor) -> torch.Tensor:
        model_stream.wait_stream(side)
        tensor.record_stream(model_stream)  # freed only once the model's stream is done with it
        return tensor

    with torch.cuda.stream(side):
        yield hand_over
