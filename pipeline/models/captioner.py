"""Image captioner: open_clip CoCa `generate()` over batches."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any

import open_clip
import torch

from clipgram.config import CaptionSettings, ModelSettings
from clipgram.models import autocast, cached_coca, load, model_cache_dir, pick_device, resolve, tiny

log = logging.getLogger("clipgram.models")

_SPECIAL = re.compile(r"<start_of_text>|<end_of_text>.*$", re.DOTALL)


def clean(text: str) -> str:
    """Decoded tokens → a plain caption: special tokens and trailing punctuation gone."""
    return _SPECIAL.sub("", text).strip(" .,!?").strip()


@dataclass(frozen=True)
class Decoding:
    """How captions are generated: the [caption] settings that open_clip's generate() takes."""

    method: str = "beam_search"     # or "top_p", "top_k" (sampling)
    max_length: int = 20            # tokens, start and end included
    num_beams: int = 6              # beam search: hypotheses kept per image…
    beam_groups: int = 3            # …in this many groups (it must divide num_beams)
    top_p: float = 0.1              # top_p sampling: the smallest set of tokens with this much probability
    top_k: int = 1                  # top_k sampling: the k likeliest tokens (1: greedy)
    temperature: float = 1.0        # sampling
    decoder: str = "cached"         # cached_coca (one token a step), or "open_clip"'s generate()

    @classmethod
    def from_config(cls, caption: CaptionSettings) -> Decoding:
        return cls(caption.generation, caption.max_length, caption.num_beams, caption.beam_groups,
                   caption.top_p, caption.top_k, caption.temperature, caption.decoder)

    def generate_kwargs(self, context_length: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"seq_len": min(self.max_length, context_length),
                                  "generation_type": self.method}
        if self.method == "beam_search":
            return kwargs | {"num_beams": self.num_beams, "num_beam_groups": self.beam_groups}
        return kwargs | {"top_p": self.top_p, "top_k": self.top_k, "temperature": self.temperature}


class Captioner:
    def __init__(self, resolved: resolve.Resolved, device: torch.device, *,
                 decoding: Decoding = Decoding(), precision: str = "auto"):
        self.id = resolved.id
        self.device = device
        self.model, self.preprocess, tokenizer = load(resolved, device)
        if not hasattr(self.model, "generate"):
            raise ValueError(f"{resolved.arch} cannot caption: use a CoCa model (e.g. coca_ViT-B-32)")
        context = self.model.text.context_length if hasattr(self.model, "text") else 77
        self.decoding = decoding
        self._generate_kwargs = decoding.generate_kwargs(context)
        self.precision = precision
        self.cached = decoding.decoder == "cached" and cached_coca.supports(self.model)
        if decoding.decoder == "cached" and not self.cached:
            log.info("%s: blocks the cached decoder does not know; captioning with open_clip's "
                     "generate()", resolved.id)
        if not self.cached:
            try:
                import transformers  # noqa: F401  (open_clip's generate() is built on it)
            except ImportError:
                raise RuntimeError("captioning with open_clip's CoCa generate() needs `transformers`: "
                                   "pip install 'transformers<4.56'") from None
        # generate()'s own defaults, which the tokenizers of open_clip's CoCa models share
        self._tokens = cached_coca.Tokens(getattr(tokenizer, "sot_token_id", 49406),
                                          getattr(tokenizer, "eot_token_id", 49407), self.model.pad_id)

    @torch.inference_mode()
    def caption(self, batch: torch.Tensor) -> list[str]:
        with autocast(self.device, self.precision):
            tokens = self.generate(batch.to(self.device, non_blocking=True))
        return [clean(open_clip.decode(t)) for t in tokens]

    def generate(self, images: torch.Tensor) -> torch.Tensor:
        """Token ids, (B, L): by the cached decoder when it can, else by open_clip's generate()."""
        if not self.cached:
            return self.model.generate(images, **self._generate_kwargs)
        d, length = self.decoding, self._generate_kwargs["seq_len"]
        if d.method == "beam_search":
            return cached_coca.beam_search(self.model, images, max_length=length,
                                           num_beams=d.num_beams // d.beam_groups, tokens=self._tokens)
        if d.method == "top_k":
            keep = partial(cached_coca.top_k_filter, k=d.top_k)
        else:
            keep = partial(cached_coca.top_p_filter, p=d.top_p)
        return cached_coca.sample(self.model, images, max_length=length, keep=keep,
                                  temperature=d.temperature, tokens=self._tokens)


@lru_cache(maxsize=2)
def _resolved(spec: str, default: str, cache_dir: str) -> resolve.Resolved:
    return resolve.resolve(spec, default=default, tiny_arch=tiny.TINY_COCA, cache_dir=model_cache_dir(cache_dir))


@lru_cache(maxsize=2)
def _captioner(spec: str, default: str, cache_dir: str, device: str, precision: str,
               decoding: Decoding) -> Captioner:
    return Captioner(_resolved(spec, default, cache_dir), pick_device(device), decoding=decoding, precision=precision)


def model_id(models: ModelSettings) -> str:
    """The id of the captioner the `[models]` settings name, without loading it."""
    return _resolved(models.captioner, models.default_captioner, models.cache_dir).id


def from_config(models: ModelSettings, caption: CaptionSettings) -> Captioner:
    """The captioner the `[models]` and `[caption]` settings name (loaded once per process)."""
    return _captioner(models.captioner, models.default_captioner, models.cache_dir, models.device,
                      models.precision, Decoding.from_config(caption))
