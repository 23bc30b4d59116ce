"""CLIP image/text encoder: L2-normalised embeddings from any open_clip model."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.models import load, pick_device, resolve, tiny


class ClipEncoder:
    def __init__(self, resolved: resolve.Resolved, device: torch.device):
        self.id = resolved.id
        self.device = device
        self.model, self.preprocess, self.tokenizer = load(resolved, device)
        self.dim = int(self.encode_text([""]).shape[1])

    @torch.inference_mode()
    def encode_images(self, batch: torch.Tensor) -> np.ndarray:
        features = self.model.encode_image(batch.to(self.device, non_blocking=True), normalize=True)
        return features.float().cpu().numpy()

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.model.encode_text(tokens, normalize=True).float().cpu().numpy()


def model_cache_dir(configured: str) -> Path:
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "clipgram" / "models"


@lru_cache(maxsize=4)
def _encoder(spec: str, default: str, cache_dir: str, device: str) -> ClipEncoder:
    resolved = resolve.resolve(spec, default=default, tiny_arch=tiny.TINY_CLIP,
                               cache_dir=model_cache_dir(cache_dir))
    return ClipEncoder(resolved, pick_device(device))


def from_config(models: Any) -> ClipEncoder:
    """The encoder the `[models]` settings name (loaded once per process)."""
    return _encoder(models.clip, models.default_clip, models.cache_dir, models.device)
