"""Embed stage: CLIP image embeddings keyed by (sha256, model id).

In a run that also captions or reads text (`[embed] with_captions`, `with_ocr`, set by the
flow when those stages follow), the images those stages would do are done in the same pass,
when their models run on the same device: each image is decoded once, and each model's
input is made from it (the same tensor for CLIP ViT-B-32 and CoCa ViT-B-32; OCR's own
larger one). The caption and ocr stages then find nothing left. Their rows are their own
stages' (`caption.head`, `ocr.head`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from clipgram import inference, loader, shards, tables
from clipgram.config import Config
from clipgram.models import captioner, clip
from clipgram.models import ocr as ocr_model
from clipgram.result import StageResult
from clipgram.stages import caption, ocr

log = logging.getLogger("clipgram.embed")


def head(encoder: clip.ClipEncoder, cfg: Config) -> inference.Head:
    def rows(batch: torch.Tensor) -> inference.Deferred:
        vectors = encoder.start_encoding(batch)  # runs while the loop fetches the next batch
        # numpy rows go to Arrow as they are: .tolist() costs more than the Parquet write
        return lambda: [{"embedding": vector} for vector in vectors()]

    return inference.Head("embed", tables.EMBEDDINGS, encoder.id, rows, cfg.embed.part_rows, failed,
                          cfg.embed.retry_failed, loader.loader_settings(cfg, "embed", encoder.device))


def embed(data_dir: Path, account: str, cfg: Config, encoder: clip.ClipEncoder | None = None,
          shard: shards.Shard | None = None, captions: captioner.Captioner | None = None,
          reader: ocr_model.OcrReader | None = None) -> StageResult:
    """Embed the account's downloaded images not yet embedded by the configured model (those
    of `shard` only, when given); with `[embed] with_captions` / `with_ocr`, caption them /
    read their text in the same pass (with `captions` / `reader`, else the configured ones)."""
    encoder = encoder or clip.from_config(cfg.models)
    heads = [head(encoder, cfg)]
    others = []
    if with_captions(cfg):
        others.append(("caption", lambda: captions or captioner.from_config(cfg.models, cfg.caption), caption.head))
    if with_ocr(cfg):
        others.append(("ocr", lambda: reader or ocr_model.from_config(cfg.ocr), ocr.head))
    for stage, load, model_head in others:
        try:
            model = load()
        except Exception as e:  # its own stage loads it again, and reports the failure as its own
            log.error("embed: the %s model does not load (%s: %s); the %s stage tries again on its own",
                      stage, type(e).__name__, e, stage)
            continue
        if model.device == encoder.device:
            heads.append(model_head(model, cfg))
        else:  # a model on another device would wait for this one's batches, or make it wait
            log.info("embed: %s runs on %s, %s on %s; the %s stage decodes the images again",
                     model.id, model.device, encoder.id, encoder.device, stage)
    results = inference.run_heads(data_dir, account, heads, encoder.preprocess, device=encoder.device,
                                  settings=heads[0].settings, shard=shard)
    done = {"caption": "captioned", "ocr": "read for text"}
    for result in results[1:]:  # the caption and ocr stages will find these done
        results[0].details[done[result.stage]] = result.done
        left = f" ({result.stage} left the pass: its stage reads the rest)" if "left_pass" in result.details else ""
        results[0].note = f"{result.done} {done[result.stage]} too{left}, {results[0].note}"
    return results[0].log()  # one line: the others' counts are in it, and their stages' own lines follow


def with_captions(cfg: Config) -> bool:
    return cfg.embed.with_captions is True


def with_ocr(cfg: Config) -> bool:
    return cfg.embed.with_ocr is True and ocr_model.published_id(cfg.ocr) is not None


def run(cfg: Config, account: str) -> StageResult:
    """The stage: in this process, or on Dask as shard tasks (shards.py)."""
    partitions = [(tables.EMBEDDINGS, clip.model_id(cfg.models), cfg.embed.retry_failed)]
    if with_captions(cfg):
        partitions.append((tables.CAPTIONS, captioner.model_id(cfg.models), cfg.caption.retry_failed))
    if with_ocr(cfg):
        partitions.append((tables.OCR, ocr_model.model_id(cfg.ocr), cfg.ocr.retry_failed))
    return shards.run(cfg, "embed", account, [(table, model) for table, model, _ in partitions],
                      lambda: len({sha for table, model, retry in partitions
                                   for sha, _ in inference.pending(cfg.data_dir, table, model, account, retry)}),
                      run_shard)


def run_shard(cfg: Config, account: str, shard: shards.Shard | None) -> StageResult:
    return embed(cfg.data_dir, account, cfg, shard=shard)


def failed(error: str) -> dict[str, Any]:
    """The row of an image that could not be embedded (it decoded at download, not here)."""
    return {"embedding": None, "error": error}
