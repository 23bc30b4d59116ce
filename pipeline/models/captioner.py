"""Image captioner: open_clip CoCa `generate()` over batches."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import open_clip
import torch

from pipeline.models import autocast, load, pick_device, resolve, tiny
from pipeline.models.clip import model_cache_dir

_SPECIAL = re.compile(r"<start_of_text>|<end_of_text>.*$", re.DOTALL)


def clean(text: str) -> str:
    """Decoded tokens → a plain caption: special tokens and trailing punctuation gone."""
    return _SPECIAL.sub("", text).strip(" .,!?").strip()


class Captioner:
    def __init__(self, resolved: resolve.Resolved, device: torch.device, *,
                 max_length: int = 20, generation: str = "beam_search", precision: str = "auto"):
        try:
            import transformers  # noqa: F401  (CoCa's generate() is built on it)
        except ImportError:
            raise RuntimeError("captioning with CoCa needs `transformers`: pip install 'transformers<4.56'") from None
        self.id = resolved.id
        self.device = device
        self.model, self.preprocess, _ = load(resolved, device)
        if not hasattr(self.model, "generate"):
            raise ValueError(f"{resolved.arch} cannot caption: use a CoCa model (e.g. coca_ViT-B-32)")
        context = self.model.text.context_length if hasattr(self.model, "text") else 77
        self.max_length = min(max_length, context)
        self.generation = generation
        self.precision = precision

    @torch.inference_mode()
    def caption(self, batch: torch.Tensor) -> list[str]:
        with autocast(self.device, self.precision):
            tokens = self.model.generate(batch.to(self.device, non_blocking=True),
                                         seq_len=self.max_length, generation_type=self.generation)
        return [clean(open_clip.decode(t)) for t in tokens]


@lru_cache(maxsize=2)
def _captioner(spec: str, default: str, cache_dir: str, device: str, precision: str,
               max_length: int, generation: str) -> Captioner:
    resolved = resolve.resolve(spec, default=default, tiny_arch=tiny.TINY_COCA,
                               cache_dir=model_cache_dir(cache_dir))
    return Captioner(resolved, pick_device(device), max_length=max_length, generation=generation,
                     precision=precision)


def from_config(models: Any, caption: Any) -> Captioner:
    """The captioner the `[models]` and `[caption]` settings name (loaded once per process)."""
    return _captioner(models.captioner, models.default_captioner, models.cache_dir, models.device,
                      models.precision, caption.max_length, caption.generation)
