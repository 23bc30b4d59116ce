"""Models behind small interfaces: an image/text encoder and a captioner.

`resolve` turns a model id into weights; `load` builds the open_clip model on
the chosen device. Another family plugs in by providing the same methods as
`clip.ClipEncoder` or `captioner.Captioner`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("clipgram.models")


def model_cache_dir(configured: str) -> Path:
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "clipgram" / "models"


def pick_device(preference: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu (saying so when it falls back)."""
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    _say_cpu()
    return torch.device("cpu")


@functools.cache
def _say_cpu() -> None:  # once per process, not once per model
    log.info("no GPU found: running models on the CPU")


def load(resolved: Any, device: torch.device) -> tuple[torch.nn.Module, Any, Any]:
    """Build (model, preprocess, tokenizer) for a `resolve.Resolved`, in eval mode."""
    import open_clip

    from clipgram.models import tiny

    tiny.register_configs()
    kwargs = dict(resolved.preprocess)
    # the tiny architectures are open_clip's with a vision tower of the project's own, built
    # first and then given their weights
    own = resolved.arch in tiny.RECIPES
    if resolved.weights is not None and not own:
        kwargs["pretrained"] = resolved.weights
    # the hub cache is already checked by resolve: don't let hub clients retry for a minute
    offline = resolved.weights is not None or os.environ.get("HF_HUB_OFFLINE")
    previous = os.environ.get("HF_HUB_OFFLINE")
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        if own:
            model, preprocess = tiny.create(resolved.arch, device=device, **kwargs)
            if resolved.weights is not None:
                open_clip.load_checkpoint(model, resolved.weights, device=device)
        else:
            model, _, preprocess = open_clip.create_model_and_transforms(
                resolved.arch, device=device, **kwargs)
    except (RuntimeError, AssertionError, KeyError) as e:
        if resolved.weights is None:
            raise
        # open_clip reports shape mismatches as asserts, size-mismatch or missing-key errors
        raise RuntimeError(f"checkpoint {resolved.weights} does not fit architecture "
                           f"{resolved.arch}: {type(e).__name__}: {e}") from None
    finally:
        if offline and previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(resolved.tokenizer or resolved.arch)


_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (bf16 where supported, else fp16); fp32 elsewhere unless asked."""
    if precision == "auto":
        if device.type != "cuda":
            return contextlib.nullcontext()
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in _DTYPES:
        raise ValueError(f"models.precision: expected auto, fp32, fp16 or bf16, got {precision!r}")
    return torch.autocast(device.type, dtype=_DTYPES[precision])
