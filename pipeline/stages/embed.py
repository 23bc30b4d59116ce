"""Embed stage: CLIP image embeddings keyed by (sha256, model id).

In a run that captions too (`[embed] with_captions`, set by the flow when the caption stage
follows), the images the caption stage would caption are captioned in the same pass when
the two models take the same input (the same preprocessing, as CLIP ViT-B-32 and CoCa
ViT-B-32 do): each image is decoded once for both, and the caption stage then finds
nothing left. Its rows are the caption stage's own (`caption.head`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from clipgram import inference, loader, shards, tables
from clipgram.config import Config
from clipgram.models import captioner, clip
from clipgram.result import StageResult
from clipgram.stages import caption

log = logging.getLogger("clipgram.embed")


def head(encoder: clip.ClipEncoder, cfg: Config) -> inference.Head:
    def rows(batch: torch.Tensor) -> inference.Deferred:
        vectors = encoder.start_encoding(batch)  # runs while the loop fetches the next batch
        # numpy rows go to Arrow as they are: .tolist() costs more than the Parquet write
        return lambda: [{"embedding": vector} for vector in vectors()]

    return inference.Head("embed", tables.EMBEDDINGS, encoder.id, rows, cfg.embed.part_rows, failed,
                          cfg.embed.retry_failed, loader.loader_settings(cfg, "embed", encoder.device))


def embed(data_dir: Path, account: str, cfg: Config, encoder: clip.ClipEncoder | None = None,
          shard: shards.Shard | None = None, captions: captioner.Captioner | None = None) -> StageResult:
    """Embed the account's downloaded images not yet embedded by the configured model (those
    of `shard` only, when given); with `[embed] with_captions`, caption them in the same pass
    (with `captions`, else the configured captioner)."""
    encoder = encoder or clip.from_config(cfg.models)
    heads = [head(encoder, cfg)]
    if with_captions(cfg):
        model = captions or captioner.from_config(cfg.models, cfg.caption)
        if same_input(encoder.preprocess, model.preprocess) and model.device == encoder.device:
            heads.append(caption.head(model, cfg))
        else:
            log.info("embed: %s and %s take different inputs; the caption stage decodes the images "
                     "again", encoder.id, model.id)
    results = inference.run_heads(data_dir, account, heads, encoder.preprocess, device=encoder.device,
                                  settings=heads[0].settings, shard=shard)
    if len(results) > 1:  # the caption stage will find these done
        results[0].details["captioned"] = results[1].done
        results[0].note = f"{results[1].done} captioned too, {results[0].note}"
    return [result.log() for result in results][0]


def with_captions(cfg: Config) -> bool:
    return cfg.embed.with_captions is True


def same_input(a: Any, b: Any) -> bool:
    """Whether two models' preprocessing gives the same tensor from an image (as printed:
    torchvision's transforms list their sizes, interpolation, mean and std)."""
    return repr(a) == repr(b)


def run(cfg: Config, account: str) -> StageResult:
    """The stage: in this process, or on Dask as shard tasks (shards.py)."""
    partitions = [(tables.EMBEDDINGS, clip.model_id(cfg.models), cfg.embed.retry_failed)]
    if with_captions(cfg):
        partitions.append((tables.CAPTIONS, captioner.model_id(cfg.models), cfg.caption.retry_failed))
    return shards.run(cfg, "embed", account, [(table, model) for table, model, _ in partitions],
                      lambda: len({sha for table, model, retry in partitions
                                   for sha, _ in inference.pending(cfg.data_dir, table, model, account, retry)}),
                      run_shard)


def run_shard(cfg: Config, account: str, shard: shards.Shard | None) -> StageResult:
    return embed(cfg.data_dir, account, cfg, shard=shard)


def failed(error: str) -> dict[str, Any]:
    """The row of an image that could not be embedded (it decoded at download, not here)."""
    return {"embedding": None, "error": error}
