"""Rerunning part of the DAG: which stages, and putting failed items back in the queue.

Stages are idempotent (each works on what is still pending), so a rerun is
the same flow over fewer stages; nothing here undoes finished work.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from clipgram import dag, tables

log = logging.getLogger("clipgram.rerun")


def first_unfinished(status_rows: list[dict], account: str, retry_failed: bool = False) -> str | None:
    """The earliest stage of `account` with work left: its last run failed or was
    interrupted, or items are pending (or failed, when retrying them). None: all done."""
    for stage in dag.NAMES:
        for row in status_rows:
            if row["account"] != account or row["stage"] != stage:
                continue
            if (row["last_run"] in ("failed", "interrupted") or row["pending"]
                    or (retry_failed and row["failed"])):
                return stage
    return None


def plan(status_rows: list[dict], account: str, stage: str | None, only: bool,
         retry_failed: bool) -> list[str]:
    """The stages a rerun runs: from `stage` (default: the first unfinished one) to the
    end, or just that stage with `only`. Empty when there is nothing to rerun."""
    if stage is None:
        stage = first_unfinished(status_rows, account, retry_failed)
        if stage is None:
            return []
    dag.stage(stage)  # an unknown name: ValueError naming the stages
    return [stage] if only else list(dag.NAMES[dag.NAMES.index(stage):])


def retrying_failed_rows(settings: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`settings` with [embed], [caption] and [ocr] retry_failed on: their outputs are
    rows, not a queue, so each stage itself takes up the images whose rows record an error.
    A changed setting also changes the stage's input fingerprint: the ledger does not skip it."""
    return {**settings, **{section: {**settings[section], "retry_failed": True}
                           for section in ("embed", "caption", "ocr")}}


def requeue_failed(data_dir: Path, account: str) -> int:
    """Mark the account's failed media pending again (the good ones are not touched)."""
    failed = tables.rows(tables.connect(data_dir), tables.MEDIA,
                         "account = ? AND status = 'failed'", [account])
    tables.write_part(data_dir, tables.MEDIA, account,
                      [{**row, "status": "pending", "error": None} for row in failed])
    log.info("%s: %d failed media queued again", account, len(failed))
    return len(failed)
