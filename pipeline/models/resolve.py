"""Model ids → weights on disk, honestly and fast.

A model is named by one string:

- `NAME:TAG`           an `open_clip.list_pretrained()` pair, e.g. `ViT-B-32:laion2b_s34b_b79k`
- `NAME:/path/to.pt`   a local checkpoint for an open_clip architecture
- `hf-hub:ORG/REPO`    an open_clip model on the Hugging Face hub
- `tiny`               the project's offline model, trained on synthetic scenes
- `auto`               the configured default when its weights are cached or
                       reachable, else `tiny` (saying so)

Weights that are neither cached nor reachable fail in seconds with a message
that says what to do, instead of a minute of hub retries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import open_clip
from open_clip.pretrained import download_pretrained_from_hf

from clipgram.errors import ClipgramError
from clipgram.models import tiny

log = logging.getLogger("clipgram.models")

HUB_HOST = "huggingface.co"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class WeightsUnavailable(ClipgramError, RuntimeError):
    pass


@dataclass(frozen=True)
class Resolved:
    """What open_clip needs to build the model, and the id its outputs are stored under."""

    id: str                 # partition-safe; identifies weights (and so preprocessing)
    arch: str               # open_clip model name, or `local-dir:` a hub snapshot
    weights: str | None     # a local file; None when open_clip reads the hub cache itself
    preprocess: dict = field(default_factory=dict)  # image_mean/std/... of a pretrained tag
    tokenizer: str | None = None  # what open_clip.get_tokenizer() is given, when not `arch`


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def _unavailable(spec: str, where: str) -> WeightsUnavailable:
    return WeightsUnavailable(
        f"weights for {spec} are not cached and {where} cannot be reached. "
        f"Download them once on a machine with internet (they land in the Hugging Face cache, "
        f"HF_HUB_CACHE), or set the model to a local checkpoint 'NAME:/path/to/weights.pt', "
        f"or use 'tiny' / 'auto' for the offline model."
    )


def _hub_cache_dir() -> str | None:
    # read the environment now: huggingface_hub fixes its default at import time
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None


def _from_hub_cache(repo: str, filenames: tuple[str, ...]) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        hit = try_to_load_from_cache(repo, name, cache_dir=_hub_cache_dir())
        if isinstance(hit, str):
            return hit
    return None


def _pretrained_tag(arch: str, tag: str) -> Resolved:
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        raise WeightsUnavailable(
            f"{arch}:{tag} is not an open_clip pretrained pair; see open_clip.list_pretrained()")
    spec = f"{arch}:{tag}"
    preprocess = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
    preprocess = {f"image_{k}": v for k, v in preprocess.items()}
    if cfg.get("hf_hub"):
        hub = cfg["hf_hub"]  # "org/repo/" (default file name) or "org/repo/file"
        repo, filename = (hub.rstrip("/"), "") if hub.endswith("/") else os.path.split(hub)
        candidates = (filename,) if filename else WEIGHT_FILES
        path = _from_hub_cache(repo, candidates)
        if path is None:
            if not _reachable(HUB_HOST):
                raise _unavailable(spec, HUB_HOST)
            path = open_clip.download_pretrained(cfg, cache_dir=_hub_cache_dir())
    else:
        url = cfg["url"]
        path = str(Path("~/.cache/clip").expanduser() / os.path.basename(urlparse(url).path))
        if not os.path.exists(path):
            if not _reachable(urlparse(url).hostname or ""):
                raise _unavailable(spec, urlparse(url).hostname)
            path = open_clip.download_pretrained(cfg)
    return Resolved(f"{arch}@{tag}", arch, path, preprocess)


def _content_id(path: str) -> str:
    """A short id of a file's bytes. The hub cache links each snapshot's files to blobs named
    by their hash: that name is the id, and a multi-GB file need not be read."""
    target = Path(path).resolve()
    return target.name[:12] if target.parent.name == "blobs" else _file_digest(target)


def _hf_hub(spec: str) -> Resolved:
    """An open_clip repo on the hub, loaded from its snapshot in the cache. Its id names the
    weights' bytes: when the repo's weights change, they embed into a partition of their own."""
    repo = spec.removeprefix("hf-hub:")
    config, weights = _from_hub_cache(repo, ("open_clip_config.json",)), _from_hub_cache(repo, WEIGHT_FILES)
    # open_clip builds a hub model with random weights when its folder has none: never let it
    if config is None or weights is None or Path(config).parent != Path(weights).parent:
        if not _reachable(HUB_HOST):
            raise _unavailable(spec, HUB_HOST)
        config = download_pretrained_from_hf(repo, "open_clip_config.json", cache_dir=_hub_cache_dir())
        weights = download_pretrained_from_hf(repo, cache_dir=_hub_cache_dir())
    text_cfg = json.loads(Path(config).read_text()).get("model_cfg", {}).get("text_cfg", {})
    # a tokenizer of Hugging Face's is not in the snapshot: open_clip finds it by the hub id
    tokenizer = spec if text_cfg.get("hf_tokenizer_name") else None
    return Resolved(f"hf-hub@{repo.replace('/', '.')}@{_content_id(weights)}",
                    f"local-dir:{Path(config).parent}", None, tokenizer=tokenizer)


def _checkpoint(arch: str, path: Path) -> Resolved:
    if not path.is_file():
        raise WeightsUnavailable(f"checkpoint {path} for {arch} does not exist")
    if arch not in open_clip.list_models():
        raise WeightsUnavailable(f"{arch} is not an open_clip architecture; see open_clip.list_models()")
    return Resolved(f"{arch}@ckpt-{_file_digest(path)}", arch, str(path))


def resolve(spec: str, *, default: str, tiny_arch: str, cache_dir: Path) -> Resolved:
    """Find the weights for `spec`; see the module docstring for the forms it takes."""
    if spec == "auto":
        try:
            return resolve(default, default=default, tiny_arch=tiny_arch, cache_dir=cache_dir)
        except WeightsUnavailable as e:
            log.warning("model auto: %s is unavailable, using the offline model %s (%s)",
                        default, tiny_arch, str(e).split(". ")[0])
            return resolve("tiny", default=default, tiny_arch=tiny_arch, cache_dir=cache_dir)
    if spec == "tiny":
        return _checkpoint(tiny_arch, tiny.ensure_checkpoint(tiny_arch, cache_dir))
    if spec.startswith("hf-hub:"):
        return _hf_hub(spec)
    arch, sep, weights = spec.partition(":")
    if not sep or not weights:
        raise WeightsUnavailable(
            f"model {spec!r}: expected NAME:TAG, NAME:/path/to/checkpoint, hf-hub:ORG/REPO, tiny or auto")
    if "/" in weights or weights.endswith((".pt", ".pth", ".bin", ".safetensors")):
        return _checkpoint(arch, Path(weights).expanduser())
    return _pretrained_tag(arch, weights)
