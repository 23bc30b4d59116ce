"""Embed stage: CLIP image embeddings keyed by (sha256, model id)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from clipgram import inference, loader, shards, tables
from clipgram.config import Config
from clipgram.models import clip
from clipgram.result import StageResult


def embed(data_dir: Path, account: str, cfg: Config, encoder: clip.ClipEncoder | None = None,
          shard: shards.Shard | None = None) -> StageResult:
    """Embed the account's downloaded images not yet embedded by the configured model (those
    of `shard` only, when given)."""
    encoder = encoder or clip.from_config(cfg.models)

    def rows(batch: torch.Tensor) -> inference.Deferred:
        vectors = encoder.start_encoding(batch)  # runs while the loop fetches the next batch
        # numpy rows go to Arrow as they are: .tolist() costs more than the Parquet write
        return lambda: [{"embedding": vector} for vector in vectors()]

    return inference.run(
        data_dir, "embed", account, tables.EMBEDDINGS, encoder.id, encoder.preprocess, rows,
        device=encoder.device, settings=loader.loader_settings(cfg, "embed", encoder.device),
        part_rows=cfg.embed.part_rows, failed_row=failed, retry_failed=cfg.embed.retry_failed, shard=shard)


def run(cfg: Config, account: str) -> StageResult:
    """The stage: in this process, or on Dask as shard tasks (shards.py)."""
    model_id = clip.model_id(cfg.models)
    return shards.run(cfg, "embed", account, tables.EMBEDDINGS, model_id, lambda: len(inference.pending(
        cfg.data_dir, tables.EMBEDDINGS, model_id, account, cfg.embed.retry_failed)), run_shard)


def run_shard(settings: shards.Settings, account: str, shard: shards.Shard | None) -> StageResult:
    cfg = shards.config(settings)
    return embed(cfg.data_dir, account, cfg, shard=shard)


def failed(error: str) -> dict[str, Any]:
    """The row of an image that could not be embedded (it decoded at download, not here)."""
    return {"embedding": None, "error": error}
