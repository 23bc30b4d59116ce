"""`make bench`: throughput of download, decode-check, embedding and captioning, in one run.

Every figure comes from the same process on the same machine, so ratios
(end-to-end over model-only, speed-up over the naive loop) mean something even
on a noisy host. Weights are random (the FLOPs are those of the real model).
Results go to bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import resource
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench import analyse as bench_analyse
from bench import app as bench_app
from bench import download as bench_download
from bench import odd_images as bench_odd_images
from bench import query as bench_query
from bench import rerun as bench_rerun
from bench import scale as bench_scale
from bench import search as bench_search
from bench import startup as bench_startup
from clipgram import images, loader, synthetic, tables
from clipgram.config import load_config
from clipgram.models import captioner as captioner_mod
from clipgram.models import clip as clip_mod
from clipgram.models import ocr as ocr_model
from clipgram.models import pick_device
from clipgram.models.resolve import Resolved
from clipgram.stages.caption import caption
from clipgram.stages.embed import embed
from clipgram.stages.ocr import ocr


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _render_jpeg(job: tuple[Path, int, int]) -> Path:
    path, size, seed = job
    rng = random.Random(seed)
    img = synthetic.render(rng.choice(synthetic.all_scenes()), size, rng)
    # photo-like grain: flat synthetic scenes would make unrealistically small JPEGs
    # σ 3.5 at 1080 px gives ~150 KB files, the size of an Instagram photo
    noise = np.random.default_rng(seed).normal(0, 3.5, (size, size, 3))
    pixels = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def make_jpegs(directory: Path, count: int, size: int) -> list[Path]:
    """Instagram-like JPEGs (size × size, with grain) of synthetic scenes, rendered in parallel."""
    directory.mkdir(parents=True, exist_ok=True)
    jobs = [(directory / f"img{i:05d}.jpg", size, i) for i in range(count)]
    with multiprocessing.Pool() as pool:
        return pool.map(_render_jpeg, jobs, chunksize=16)


@contextmanager
def gpu_utilisation(samples: list[float]) -> Iterator[None]:
    """Sample the GPU's utilisation (%) every 50 ms while the block runs, when NVML is there."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:  # no NVIDIA driver or no nvidia-ml-py: nothing to sample
        yield
        return
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            samples.append(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def download_set(site: Path, rendered: list[Path], count: int) -> list[str]:
    """`count` URLs' worth of files over the rendered images (hard links when there are fewer).

    Every URL is fetched and decode-verified in full; identical bytes are stored
    once, so the embedding part sees only the distinct images.
    """
    names = []
    for i in range(count):
        source = rendered[i % len(rendered)]
        name = source.name if i < len(rendered) else f"copy{i:05d}-{source.name}"
        if not (site / name).exists():
            os.link(source, site / name)
        names.append(name)
    return names


def _decode_ips(files: list[Path], preprocess: Callable, settings: loader.LoaderSettings,
                device: torch.device) -> tuple[float, loader.Split | None]:
    dataset = loader.dataset(files, preprocess, settings)
    start = time.perf_counter()
    decoded = sum(len(i) for i, _, _ in loader.batches(dataset, settings, device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return decoded / (time.perf_counter() - start), dataset.split


def bench_decode(files: list[Path], preprocess: Callable, settings: loader.LoaderSettings,
                 device: torch.device) -> dict[str, Any]:
    """Decode-only img/s (files → preprocessed batches on `device`, no model) of each way to decode:
    on the CPU with libjpeg's draft scaling off and on; where `settings` use the device's decoder,
    every JPEG through it (nvjpeg on CUDA) and the balanced split of JPEGs between both.

    The ways take turns, best of two each, so that a busy moment of the host lands on no one figure.
    """
    cpu = replace(settings, gpu_decode=False)
    ways = {"cpu_full": replace(cpu, draft_factor=0.0), "cpu_draft": cpu}
    if settings.gpu_decode:
        ways["nvjpeg"] = replace(settings, gpu_share=1.0)
        ways["split"] = replace(settings, gpu_share=None)
    _decode_ips(files[:settings.batch_size], preprocess, cpu, device)  # starts the fork server
    best = dict.fromkeys(ways, 0.0)
    split_summary = None
    for _ in range(2):
        for name, way in ways.items():
            ips, split = _decode_ips(files, preprocess, way, device)
            if ips > best[name]:
                best[name] = ips
                split_summary = split.summary() if name == "split" and split else split_summary
    return {"decode_ips": {"nvjpeg": None, "split": None, **best},
            "draft_min_side": loader.draft_side(preprocess, settings.draft_factor),
            "draft_speedup": best["cpu_draft"] / best["cpu_full"], "decode_split": split_summary}


REPEATS = 3  # each rate is the median of this many runs (issue 15: noisy hosts)


def repeated(stage: Callable[[int], Any], model_only: Callable[[], float],
             repeats: int = REPEATS) -> dict[str, float]:
    """A model stage's end-to-end figures, each the median of `repeats` runs: `stage(i)` runs it
    over the same images (into a partition of its own) and returns its StageResult. The pass's
    fixed cost (decode workers' start and its first batch, `first_batch_s`) is reported apart,
    and `steady_ips` is the rate without it. `model_only()` (the model's rate on decoded
    tensors) runs before each: the two take turns, so a slow moment of a noisy host lands on
    both rather than on one side of their ratio."""
    runs = []
    for i in range(repeats):
        model_ips = model_only()
        start = time.perf_counter()
        result = stage(i)
        seconds = time.perf_counter() - start
        fixed = result.details.get("first_batch_s", 0.0)
        runs.append({"ips": result.done / seconds, "first_batch_s": fixed, "model_only_ips": model_ips,
                     "steady_ips": result.done / (seconds - fixed), "images": result.done})
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]} | {"repeats": repeats}


def bench_embed(data_dir: Path, arch: str, device: torch.device, count: int,
                batch_size: int, num_workers: int | None) -> dict[str, Any]:
    start = time.perf_counter()
    encoder = clip_mod.ClipEncoder(Resolved(f"{arch}@random", arch, None), device)
    model_load_s = time.perf_counter() - start
    paths = sorted((data_dir / "media").rglob("*.jpg"))[:count]
    tensors = torch.stack([encoder.preprocess(images.load_rgb(p)) for p in paths])
    encoder.encode_images(tensors[:batch_size])  # warm-up

    def model_only() -> float:
        return len(tensors) / _timed(lambda: [encoder.encode_images(tensors[i:i + batch_size])
                                              for i in range(0, len(tensors), batch_size)])

    naive_n = max(8, count // 4)

    def naive() -> None:  # open_clip's README loop: one image at a time
        for p in paths[:naive_n]:
            with torch.no_grad():
                x = encoder.preprocess(Image.open(p)).unsqueeze(0).to(device)
                encoder.model.encode_image(x)
    naive_s = _timed(naive)

    cfg = load_config(overrides={"data": {"dir": str(data_dir)}, "embed": {"batch_size": batch_size},
                                 "decode": {"workers": num_workers}}, environ={})
    settings = loader.loader_settings(cfg, "embed", device)
    decode = bench_decode(sorted((data_dir / "media").rglob("*.jpg")), encoder.preprocess, settings, device)
    decode_only_ips = decode["decode_ips"]["split" if settings.gpu_decode else "cpu_draft"]  # the default
    utilisation: list[float] = []
    splits = []

    def run(i: int) -> Any:  # JPEG files → Parquet, every stored image, a partition each time
        encoder.id = f"{arch}@random-{i}"
        result = embed(data_dir, "bench", cfg, encoder)
        splits.append(result.details.get("decode_split"))
        return result
    with gpu_utilisation(utilisation):
        e2e = repeated(run, model_only)
    model_only_ips = e2e["model_only_ips"]
    naive_ips = naive_n / naive_s
    return {
        "model": f"{arch} (random weights)", "images": e2e["images"], "batch_size": batch_size,
        "workers": settings.workers, "model_load_s": model_load_s, "model_only_ips": model_only_ips,
        "decode_only_ips": decode_only_ips, **decode, "e2e_ips": e2e["ips"], "e2e_steady_ips": e2e["steady_ips"],
        "e2e_first_batch_s": e2e["first_batch_s"], "repeats": e2e["repeats"], "e2e_split": splits[-1],
        "e2e_over_model_only": e2e["steady_ips"] / model_only_ips, "naive_ips": naive_ips,
        "naive_speedup": e2e["ips"] / naive_ips, "peak_rss_mb": _peak_rss_mb(),
        "gpu_utilisation_pct": sum(utilisation) / len(utilisation) if utilisation else None,
    }


def _captions_per_second(captioner: captioner_mod.Captioner, images: torch.Tensor, batch_size: int) -> float:
    captioner.caption(images[:1])  # warm-up
    return len(images) / _timed(lambda: [captioner.caption(images[i:i + batch_size])
                                         for i in range(0, len(images), batch_size)])


def _open_clip_generate_ips(model: captioner_mod.Captioner, arch: str, images: torch.Tensor) -> float | None:
    """The same weights through open_clip's generate(), on one batch (it is slow); None where it
    cannot run: it needs transformers < 4.56, and a GPU host may carry a newer one."""
    try:
        reference = captioner_mod.Captioner(Resolved(model.id, arch, None), model.device,
                                            decoding=replace(model.decoding, decoder="open_clip"))
        reference.model.load_state_dict(model.model.state_dict())
        return _captions_per_second(reference, images, len(images))
    except (RuntimeError, AssertionError, ImportError) as e:
        print(f"open_clip's generate() cannot run here ({type(e).__name__}: {e}); no speed-up figure")
        return None


def _random_captioner(arch: str, model_id: str, device: torch.device) -> captioner_mod.Captioner:
    model = captioner_mod.Captioner(Resolved(model_id, arch, None), device)
    # open_clip leaves this projection uninitialised (torch.empty): give it the scale of trained weights
    projection = model.model.text_decoder.text_projection
    torch.nn.init.normal_(projection, std=projection.shape[0] ** -0.5)
    return model


def _account_of(data_dir: Path, account: str, count: int) -> list[dict[str, Any]]:
    """The media rows of `count` distinct images the download bench stored, written again as
    `account`'s: a stage run over that account has those images, nothing more."""
    media = tables.connect(data_dir).execute(
        "SELECT DISTINCT ON (sha256) * FROM media WHERE account = 'bench' AND status = 'done' "
        "ORDER BY sha256 LIMIT ?", [count]).arrow().read_all().to_pylist()
    tables.write_part(data_dir, tables.MEDIA, account, media)
    return media


REFERENCE_IMAGES = 4


def bench_caption(data_dir: Path, arch: str, device: torch.device, count: int,
                  batch_size: int, num_workers: int | None) -> dict[str, Any]:
    """CoCa captions/s: model-only on pre-decoded tensors with the cached decoder and with
    open_clip's generate(), and end to end through the caption stage (JPEG files → Parquet)
    over the same `count` stored images, as an account of their own."""
    start = time.perf_counter()
    model = _random_captioner(arch, f"{arch}@random", device)
    model_load_s = time.perf_counter() - start
    media = _account_of(data_dir, "bench-caption", count)
    batch = torch.stack([model.preprocess(images.load_rgb(data_dir / row["path"])) for row in media])
    # open_clip's generate() takes about 7 s a caption here: it and the cached decoder caption
    # the same few images, at the same batch size, for the speed-up
    reference = batch[:REFERENCE_IMAGES]
    open_clip_ips = _open_clip_generate_ips(model, arch, reference)
    cached_ips = _captions_per_second(model, reference, len(reference)) if open_clip_ips else None
    cfg = load_config(overrides={"data": {"dir": str(data_dir)}, "caption": {"batch_size": batch_size},
                                 "decode": {"workers": num_workers}}, environ={})
    utilisation: list[float] = []

    def run(i: int) -> Any:  # a partition of its own each time: every image to caption again
        model.id = f"{arch}@random-{i}"
        return caption(data_dir, "bench-caption", cfg, model)
    with gpu_utilisation(utilisation):
        e2e = repeated(run, lambda: _captions_per_second(model, batch, batch_size))
    model_only_ips = e2e["model_only_ips"]
    return {"model": f"{arch} (random weights)", "images": e2e["images"], "batch_size": batch_size,
            "generation": model.decoding.method, "max_length": model.decoding.max_length,
            "model_load_s": model_load_s, "model_only_ips": model_only_ips, "e2e_ips": e2e["ips"],
            "ips": e2e["ips"], "e2e_steady_ips": e2e["steady_ips"], "e2e_first_batch_s": e2e["first_batch_s"],
            "repeats": e2e["repeats"], "e2e_over_model_only": e2e["steady_ips"] / model_only_ips,
            "open_clip_generate_ips": open_clip_ips, "reference_images": len(reference),
            "cached_decoder_speedup": cached_ips / open_clip_ips if open_clip_ips else None,
            "gpu_utilisation_pct": sum(utilisation) / len(utilisation) if utilisation else None}


def _ocr_reader() -> ocr_model.OcrReader | None:
    """The configured OCR model (real weights: they ship in its wheel); None when not installed."""
    try:
        return ocr_model.from_config(load_config(environ={}).ocr)
    except ocr_model.OcrMissing as e:
        print(f"no OCR figures: {e}")
        return None


def bench_ocr(data_dir: Path, count: int, num_workers: int | None) -> dict[str, Any] | None:
    """PP-OCRv4 images/s (the configured engine and size, real weights): model only on inputs
    decoded beforehand, and end to end through the ocr stage (JPEG files → Parquet) over the
    same `count` stored images, as an account of their own. The bench's images hold shapes,
    no text: the detector runs on every pixel, the recogniser on little."""
    start = time.perf_counter()
    reader = _ocr_reader()
    if reader is None:
        return None
    model_load_s = time.perf_counter() - start
    model_id = reader.id
    media = _account_of(data_dir, "bench-ocr", count)
    batch = loader.stack([reader.preprocess(images.load_rgb(data_dir / row["path"])) for row in media])
    reader.read(batch[:1])  # warm-up
    cfg = load_config(overrides={"data": {"dir": str(data_dir)}, "decode": {"workers": num_workers}}, environ={})

    def run(i: int) -> Any:  # a partition of its own each time: every image to read again
        reader.id = f"{model_id}-bench-{i}"
        return ocr(data_dir, "bench-ocr", cfg, reader)
    e2e = repeated(run, lambda: len(batch) / _timed(lambda: reader.read(batch)))
    return {"model": model_id, "max_side": cfg.ocr.max_side, "images": e2e["images"], "model_load_s": model_load_s,
            "model_only_ips": e2e["model_only_ips"], "e2e_ips": e2e["ips"], "e2e_steady_ips": e2e["steady_ips"],
            "e2e_first_batch_s": e2e["first_batch_s"], "repeats": e2e["repeats"],
            "e2e_over_model_only": e2e["steady_ips"] / e2e["model_only_ips"]}


def bench_one_pass(data_dir: Path, device: torch.device, count: int, batch_size: int,
                   caption_batch_size: int, num_workers: int | None, separate: dict[str, float]) -> dict[str, Any]:
    """A run that embeds, captions and reads the text of `count` stored images (an account of
    their own): the embed stage's one pass, each image decoded once for all three models (OCR
    when it runs on the same device as CLIP), against the stages' own end-to-end rates
    (`separate`: measured in this run, each decoding every image)."""
    # ids of their own: the model benches' rows are not this pass's to skip
    encoder = clip_mod.ClipEncoder(Resolved("ViT-B-32@random-one-pass", "ViT-B-32", None), device)
    model = _random_captioner("coca_ViT-B-32", "coca_ViT-B-32@random-one-pass", device)
    reader = _ocr_reader() if "ocr" in separate else None
    with_ocr = reader is not None and reader.device == device
    if reader is not None:
        reader.id += "-one-pass"
    media = _account_of(data_dir, "bench-one-pass", count)
    cfg = load_config(overrides={"data": {"dir": str(data_dir)}, "embed": {
        "batch_size": batch_size, "with_captions": True, "with_ocr": with_ocr},
        "caption": {"batch_size": caption_batch_size}, "decode": {"workers": num_workers}}, environ={})
    start = time.perf_counter()
    result = embed(data_dir, "bench-one-pass", cfg, encoder, captions=model, reader=reader)
    seconds = time.perf_counter() - start
    stages = ["embed", "caption", *(["ocr"] if with_ocr else [])]
    apart = 1 / sum(1 / separate[stage] for stage in stages)  # an image through each, one after the other
    return {"images": len(media), "models": stages, "embedded": result.done,
            "captioned": result.details.get("captioned", 0), "read_for_text": result.details.get("read for text"),
            "decodes_per_image": result.details["decoded"] / len(media),
            "separate_decodes_per_image": float(len(stages)),
            "one_pass_ips": len(media) / seconds, "separate_ips": apart,
            "one_pass_over_separate": len(media) / seconds / apart}


def main(argv: list[str] | None = None) -> None:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__)
    # on a GPU, 2,000 images embed in about a second: fixed costs (worker start-up, the
    # pending query, the Parquet write) would then be most of what e2e measures
    parser.add_argument("--images", type=int, default=8000 if gpu else 2000,
                        help="download set size (URLs)")
    parser.add_argument("--distinct", type=int, default=8000 if gpu else 256,
                        help="distinct images rendered for it (and stored, embedded)")
    parser.add_argument("--embed-images", type=int, default=1024 if gpu else 64)
    parser.add_argument("--caption-images", type=int, default=512 if gpu else 32)
    parser.add_argument("--ocr-images", type=int, default=64 if gpu else 16)
    parser.add_argument("--one-pass-images", type=int, default=512 if gpu else 32)
    parser.add_argument("--caption-batch-size", type=int, default=64 if gpu else 32)
    parser.add_argument("--size", type=int, default=1080, help="JPEG side (Instagram: 1080)")
    parser.add_argument("--batch-size", type=int, default=256 if gpu else 32)
    parser.add_argument("--workers", type=int, default=None if gpu else 1,
                        help="decode workers (default on a GPU: decode.workers = auto)")
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    parser.add_argument("--models-only", action="store_true",
                        help="download, decode, embed and caption only: the sections a GPU host changes "
                             "(bench/device.sh)")
    args = parser.parse_args(argv)
    device = pick_device("auto")
    work = Path(tempfile.mkdtemp(prefix="clipgram-bench-"))
    try:
        distinct = min(args.distinct, args.images)
        print(f"rendering {distinct} JPEGs of {args.size}px …", flush=True)
        site = work / "site"
        names = download_set(site, make_jpegs(site, distinct, args.size), args.images)
        results: dict[str, Any] = {"device": str(device), "host": platform.node(), "torch": torch.__version__,
                                   "section_seconds": {}}

        def section(name: str, run: Callable[[], Any]) -> Any:
            """results[name] = run(), its wall time in section_seconds: what makes `make bench` long."""
            started = time.perf_counter()
            results[name] = run()
            results["section_seconds"][name] = round(time.perf_counter() - started, 1)
            return results[name]

        # on one core, then all: the server in its own process (bench/download.py)
        section("download", lambda: bench_download.run(work / "download", site, names))
        data = work / "download" / "all_cores"  # what the stage stored: embedded and captioned next
        stored = sorted((data / "media").rglob("*.jpg"))
        results["verify_ips"] = len(stored) / _timed(lambda: [images.verify(p) for p in stored])
        section("embed", lambda: bench_embed(data, "ViT-B-32", device, args.embed_images,
                                             args.batch_size, args.workers))
        section("caption", lambda: bench_caption(data, "coca_ViT-B-32", device, args.caption_images,
                                                 args.caption_batch_size, args.workers))
        section("ocr", lambda: bench_ocr(data, args.ocr_images, args.workers))
        # a run that does all three: one decode an image (issues 15, 31), against the stages above
        separate = {stage: results[stage]["e2e_ips"] for stage in ("embed", "caption", "ocr") if results[stage]}
        section("one_pass", lambda: bench_one_pass(
            data, device, args.one_pass_images, args.batch_size, args.caption_batch_size, args.workers, separate))
        if args.models_only:
            _write(results, args.out)
            return
        section("search", bench_search.run)  # text→image top-10 over 100k and 1M vectors
        section("rerun", bench_rerun.run)  # a no-op rerun of a 1,000-image account
        section("startup", bench_startup.run)  # a fresh process: sql, status, search on the demo
        # the analyse stage, first and incremental, at 10k and 100k; the app over HTTP then
        # serves the 100k library it leaves (built once: the two took 270 s apart)
        library = work / "library-100k"
        section("analyse", lambda: bench_analyse.run(keep=library))
        section("app", lambda: bench_app.run(images=100_000, repeats=100, built=library))
        section("query", lambda: bench_query.run(scenes=2000))  # which results match: demo and 2,000 scenes
        # one library embedded on one Dask worker, then two: 1,000 images here to keep make bench
        # within 15 minutes (python -m bench.scale: 2,000)
        section("scale", lambda: bench_scale.run(images=1000))
        # odd and broken files from image libraries' test suites (tests/image_sample.txt; the
        # whole corpus of 2,600: python -m bench.odd_images), when shared/samples has them
        section("odd_images", lambda: bench_odd_images.run(work / "odd-images"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _write(results, args.out)


def _write(results: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
