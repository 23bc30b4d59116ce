"""CLIP image/text encoder: L2-normalised embeddings from any open_clip model."""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clipgram.config import ModelSettings
from clipgram.models import (
    autocast,
    load,
    model_cache_dir,
    pick_device,
    query_encoder,
    resolve,
    tiny,
)


class ClipEncoder:
    def __init__(self, resolved: resolve.Resolved, device: torch.device, *,
                 precision: str = "auto", compile: bool = False, channels_last: bool = False):
        self.id = resolved.id
        self.device = device
        self.precision = precision
        self.model, self.preprocess, self.tokenizer = load(resolved, device)
        self._channels_last = channels_last
        if channels_last:
            self.model.visual.to(memory_format=torch.channels_last)
        self._encode_image = torch.compile(self.model.encode_image) if compile else self.model.encode_image
        self.dim = int(self.encode_text([""]).shape[1])
        # how the model turns cosines into logits (open_clip keeps its log); 100 when it has none
        scale = getattr(self.model, "logit_scale", None)
        self.logit_scale = float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else 100.0

    @torch.inference_mode()
    def start_encoding(self, batch: torch.Tensor) -> Callable[[], np.ndarray]:
        """Launch the image encoder on (N, 3, H, W) preprocessed images; the returned function
        waits for their (N, d) unit vectors, as float32.

        On CUDA the copy back to the host is queued behind the model, so the caller
        can prepare the next batch while this one runs (the GPU is never left idle).
        """
        batch = batch.to(self.device, non_blocking=True)
        if self._channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            features = self._encode_image(batch)
        vectors = F.normalize(features.float(), dim=-1)
        if vectors.device.type != "cuda":
            ready = vectors.cpu().numpy()
            return lambda: ready
        host = torch.empty(vectors.shape, dtype=vectors.dtype, pin_memory=True)
        host.copy_(vectors, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(vectors.device))  # models.device may be cuda:1

        def wait() -> np.ndarray:
            copied.synchronize()
            return host.numpy()
        return wait

    def encode_images(self, batch: torch.Tensor) -> np.ndarray:
        """(N, 3, H, W) preprocessed images → (N, d) unit vectors, as float32."""
        return self.start_encoding(batch)()

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self.tokenizer(list(texts)).to(self.device)
        with autocast(self.device, self.precision):
            features = self.model.encode_text(tokens)
        return F.normalize(features.float(), dim=-1).cpu().numpy()


@lru_cache(maxsize=4)
def _resolved(spec: str, default: str, cache_dir: str) -> resolve.Resolved:
    return resolve.resolve(spec, default=default, tiny_arch=tiny.TINY_CLIP, cache_dir=model_cache_dir(cache_dir))


@lru_cache(maxsize=4)
def _encoder(spec: str, default: str, cache_dir: str, device: str, precision: str,
             compile: bool, channels_last: bool) -> ClipEncoder:
    encoder = ClipEncoder(_resolved(spec, default, cache_dir), pick_device(device), precision=precision, compile=compile,
                          channels_last=channels_last)
    query_encoder.save(encoder, model_cache_dir(cache_dir))  # the next search's fast start
    return encoder


def model_id(models: ModelSettings) -> str:
    """The id of the model the `[models]` settings name, without loading it."""
    return _resolved(models.clip, models.default_clip, models.cache_dir).id


def from_config(models: ModelSettings) -> ClipEncoder:
    """The encoder the `[models]` settings name (loaded once per process)."""
    return _encoder(models.clip, models.default_clip, models.cache_dir, models.device,
                    models.precision, models.compile, models.channels_last)
