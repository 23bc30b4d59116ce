"""A CLIP model's text tower saved on its own, so that a search encodes its query with torch
alone.

Importing open_clip brings torchvision, timm, transformers and torch._dynamo: 2–3 s of every
`clipgram search`, more than the search. So when a model is first loaded, its text tower is
traced to TorchScript and saved under the model cache, named by the model id (which names the
weights); loading it takes 0.02 s. The tokenizer is open_clip's own SimpleTokenizer, loaded
from its module file without the package (that file imports nothing else of open_clip).

This only ever saves time: a model whose tokenizer is another, a trace that does not give the
model's own vectors, a torn file or a torch without TorchScript all mean no saved tower, and
the caller loads the whole model as before.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("clipgram.models")

FORMAT = 2
# texts that exercise what the tokenizer does: case, punctuation, digits, accents, html,
# whitespace, emoji, and one longer than any context (truncation)
PROBES = ("a photo of a red square", "Two DOGS, one cat!", "café &amp; crème brûlée 2024",
          "  spaced\tout\n", "🙂 #sunset @friend", " ".join(["word"] * 100), "")


def path(cache_dir: Path, model_id: str) -> Path:
    return cache_dir / "query" / f"{model_id}.pt"


@functools.cache
def _tokenizer_module() -> ModuleType | None:
    """open_clip/tokenizer.py as a module of its own, without running open_clip/__init__."""
    spec = importlib.util.find_spec("open_clip")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("clipgram_open_clip_tokenizer", source)
    if module_spec is None or module_spec.loader is None:
        return None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _tokenizer(context_length: int) -> Any:
    module = _tokenizer_module()
    if module is None:
        raise ImportError("open_clip's tokenizer module is not installed")
    return module.SimpleTokenizer(context_length=context_length)


class _TextTower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


def _text_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A CPU copy of the model but for `visual`, which encode_text never touches: the saved
    file then holds the text tower's weights only, and the loaded model stays where it is."""
    text_only = copy.copy(model)
    text_only._modules = {k: v for k, v in model._modules.items() if k != "visual"}
    return copy.deepcopy(text_only).float().cpu()


@dataclass
class QueryEncoder:
    """Encodes text as the model it was saved from does: `id`, `dim`, `logit_scale`,
    `encode_text`, as `clip.ClipEncoder` has them (images need the whole model)."""

    id: str
    dim: int
    logit_scale: float
    module: torch.jit.ScriptModule
    tokenizer: Any

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        return self.module(self.tokenizer(list(texts))).numpy()


def save(encoder: Any, cache_dir: Path) -> Path | None:
    """Save the text tower of a loaded `clip.ClipEncoder` (a no-op when saved already); None
    when it cannot be saved faithfully."""
    target = path(cache_dir, encoder.id)
    if target.exists():
        return target
    try:
        context_length = int(encoder.tokenizer.context_length)
        tokenizer = _tokenizer(context_length)
        if not all(torch.equal(tokenizer([t]), encoder.tokenizer([t])) for t in PROBES):
            log.debug("%s: its tokenizer is not open_clip's SimpleTokenizer; no query encoder saved",
                      encoder.id)
            return None
        tower = _TextTower(_text_copy(encoder.model)).eval()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer notes
            traced = torch.jit.trace(tower, tokenizer(list(PROBES[:2])), check_trace=False)
            # the trace must give the tower's vectors at another batch size, or it is not kept
            probes = tokenizer(list(PROBES))
            if not torch.allclose(traced(probes), tower(probes), atol=1e-5):
                log.debug("%s: the traced text tower differs from the model; not saved", encoder.id)
                return None
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(f".{os.getpid()}.tmp")
            meta = {"format": FORMAT, "id": encoder.id, "dim": int(encoder.dim),
                    "logit_scale": encoder.logit_scale,
                    "context_length": context_length}
            torch.jit.save(traced, str(partial), _extra_files={"clipgram.json": json.dumps(meta)})
        os.replace(partial, target)
    except Exception as e:  # noqa: BLE001 — any failure means the slow path, never an error
        log.debug("%s: no query encoder saved: %s: %s", encoder.id, type(e).__name__, e)
        return None
    log.debug("saved %s's text tower to %s", encoder.id, target)
    return target


def load(cache_dir: Path, model_id: str) -> QueryEncoder | None:
    """The saved text tower of `model_id`, or None when there is none that loads."""
    source = path(cache_dir, model_id)
    if not source.exists():
        return None
    try:
        extra = {"clipgram.json": ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(source), map_location="cpu", _extra_files=extra)
        meta = json.loads(extra["clipgram.json"])
        if meta.get("format") != FORMAT or meta.get("id") != model_id:
            raise ValueError(f"saved as {meta.get('id')!r}, format {meta.get('format')!r}")
        return QueryEncoder(model_id, int(meta["dim"]), float(meta["logit_scale"]), module.eval(), _tokenizer(int(meta["context_length"])))
    except Exception as e:  # noqa: BLE001 — a torn, foreign or older file: the caller loads
        # the whole model, and that load saves the tower afresh once this one is gone
        log.debug("%s: saved query encoder %s does not load: %s: %s", model_id, source, type(e).__name__, e)
        source.unlink(missing_ok=True)
        return None
