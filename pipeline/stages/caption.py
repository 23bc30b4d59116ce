"""Caption stage: CoCa captions keyed by (sha256, captioner id)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from clipgram import inference, loader, shards, tables
from clipgram.config import Config
from clipgram.models import captioner
from clipgram.result import StageResult

log = logging.getLogger("clipgram.caption")


def failed(error: str) -> dict[str, Any]:
    return {"caption": None, "error": error}


def caption_rows(model: captioner.Captioner, batch: torch.Tensor) -> list[dict[str, Any]]:
    """One row per image; an image whose generation fails gets a row saying why.

    A failed batch is captioned again one image at a time, so one bad image costs only
    its own caption. If every image of the batch fails on its own too, the model (not an
    image) is at fault: the stage stops with an error and records nothing for the batch.
    """
    try:
        return [{"caption": text, "error": None} for text in model.caption(batch)]
    except Exception as e:
        if inference.is_out_of_memory(e):
            raise  # no bad image: inference.HalveOnOOM splits the batch
        if len(batch) == 1:
            return [failed(f"captioning failed: {type(e).__name__}: {e}")]
        log.warning("captioning a batch of %d failed (%s: %s); captioning it one image at a time",
                    len(batch), type(e).__name__, e)
    rows = [row for image in batch.split(1) for row in caption_rows(model, image)]
    if all(row["error"] for row in rows):
        raise RuntimeError(f"{rows[0]['error']}, for every image of a batch of {len(rows)}, "
                           f"one by one too: the captioner is at fault, not the images")
    return rows


def head(model: captioner.Captioner, cfg: Config) -> inference.Head:
    return inference.Head("caption", tables.CAPTIONS, model.id, lambda batch: caption_rows(model, batch),
                          cfg.caption.part_rows, failed, cfg.caption.retry_failed,
                          loader.loader_settings(cfg, "caption", model.device), model.preprocess)


def caption(data_dir: Path, account: str, cfg: Config, model: captioner.Captioner | None = None,
            shard: shards.Shard | None = None) -> StageResult:
    """Caption the account's downloaded images not yet captioned by the configured captioner
    (those of `shard` only, when given)."""
    model = model or captioner.from_config(cfg.models, cfg.caption)
    one = head(model, cfg)
    return inference.run_heads(data_dir, account, [one], model.preprocess, device=model.device,
                               settings=one.settings, shard=shard)[0].log()


def run(cfg: Config, account: str) -> StageResult:
    """The stage: in this process, or on Dask as shard tasks (shards.py)."""
    model_id = captioner.model_id(cfg.models)

    def pending() -> int:
        return len(inference.pending(cfg.data_dir, tables.CAPTIONS, model_id, account, cfg.caption.retry_failed))
    done = inference.done_in_embed_pass("caption", account, model_id, cfg.embed.with_captions is True,
                                        "captioned", pending)
    return done or shards.run(cfg, "caption", account, [(tables.CAPTIONS, model_id)], pending, run_shard)


def run_shard(cfg: Config, account: str, shard: shards.Shard | None) -> StageResult:
    return caption(cfg.data_dir, account, cfg, shard=shard)
