"""OCR stage: the text in each image, keyed by (sha256, OCR model id).

Like embed and caption: the to-do list is the account's downloaded images missing from the
model's partition, an image that fails is its failed row with the reason, and on Dask the
work goes out in shards. Off with `[ocr] enabled = false`; where the OCR package is not
installed the stage says how to install it and does nothing else.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from clipgram import inference, loader, shards, tables
from clipgram.config import Config
from clipgram.models import ocr as ocr_model
from clipgram.result import StageResult

log = logging.getLogger("clipgram.ocr")


def failed(error: str) -> dict[str, Any]:
    return {"text": None, "words": None, "lines": None, "languages": None, "error": error}


def read_rows(reader: ocr_model.OcrReader, batch: torch.Tensor) -> list[dict[str, Any]]:
    """One row per image; an image the engine fails on gets a row saying why, alone."""
    rows = []
    for item in batch:
        try:
            rows.append(reader.read_image(item))
        except Exception as e:  # the engine's failure on these pixels: this image's row
            rows.append(failed(f"reading text failed: {type(e).__name__}: {e}"))
    if len(rows) > 1 and all(row["error"] for row in rows):
        raise RuntimeError(f"{rows[0]['error']}, for every image of a batch of {len(rows)}: "
                           f"the OCR engine is at fault, not the images")
    return rows


def head(reader: ocr_model.OcrReader, cfg: Config) -> inference.Head:
    settings = loader.loader_settings(cfg, "ocr", reader.device)
    return inference.Head("ocr", tables.OCR, reader.id, lambda batch: read_rows(reader, batch),
                          cfg.ocr.part_rows, failed, cfg.ocr.retry_failed, settings, reader.preprocess)


def ocr(data_dir: Path, account: str, cfg: Config, reader: ocr_model.OcrReader | None = None,
        shard: shards.Shard | None = None) -> StageResult:
    """Read the text of the account's downloaded images not yet read by the configured model
    (those of `shard` only, when given)."""
    reader = reader or ocr_model.from_config(cfg.ocr)
    one = head(reader, cfg)
    return inference.run_heads(data_dir, account, [one], reader.preprocess, device=reader.device,
                               settings=one.settings, shard=shard)[0].log()


def run(cfg: Config, account: str) -> StageResult:
    """The stage: in this process, or on Dask as shard tasks (shards.py)."""
    if not cfg.ocr.enabled:
        return StageResult("ocr", account, note="off ([ocr] enabled = false)").log()
    try:
        model_id = ocr_model.model_id(cfg.ocr)
    except ocr_model.OcrMissing as e:
        log.warning("%s", e)
        return StageResult("ocr", account, note=f"not installed: {ocr_model.INSTALL}").log()

    def pending() -> int:
        return len(inference.pending(cfg.data_dir, tables.OCR, model_id, account, cfg.ocr.retry_failed))
    done = inference.done_in_embed_pass("ocr", account, model_id, cfg.embed.with_ocr is True, "read them",
                                        pending)
    return done or shards.run(cfg, "ocr", account, [(tables.OCR, model_id)], pending, run_shard)


def run_shard(cfg: Config, account: str, shard: shards.Shard | None) -> StageResult:
    return ocr(cfg.data_dir, account, cfg, shard=shard)
