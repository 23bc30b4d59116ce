"""Caption stage: CoCa captions keyed by (sha256, captioner id)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline import inference, loader, tables
from pipeline.models import captioner
from pipeline.stages import StageResult


def caption(data_dir: Path, account: str, cfg: Any) -> StageResult:
    model = captioner.from_config(cfg.models, cfg.caption)

    def rows(batch: torch.Tensor) -> list[dict[str, Any]]:
        return [{"caption": text, "error": None} for text in model.caption(batch)]

    return inference.run(
        data_dir, "caption", account, tables.CAPTIONS, model.id, model.preprocess, rows,
        device=model.device, settings=loader.loader_settings(cfg, "caption", model.device),
        part_rows=cfg.embed.part_rows, failed_row=lambda error: {"caption": None, "error": error},
        retry_failed=cfg.caption.retry_failed)
