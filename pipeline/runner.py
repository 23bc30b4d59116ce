"""One stage of one account, by name: what it runs, what its inputs are, and its ledger entry.

This is what the Prefect tasks call (flows/ingest.py), and it is plain code a
test can drive without Prefect.
"""

from __future__ import annotations

from typing import Any

import httpx
import requests
from instaloader import exceptions as ig

from clipgram import dag, ledger, storage
from clipgram.config import Config
from clipgram.result import StageResult
from clipgram.sources.session import ScrapeError


def run_stage(cfg: Config, run_id: str, account: str, name: str,
              recorded: str | None = None, source: str | None = None) -> StageResult:
    """Run stage `name` for `account`, recorded in the runs ledger, skipped when its inputs
    are unchanged."""
    stage = dag.stage(name)
    storage.pull(cfg.data_dir)  # on another machine (Dask), or after one: the store's tables
    return ledger.record(cfg.data_dir, run_id, account, name,
                         lambda: stage.run(cfg, account, (recorded, source)),
                         dag.fingerprint(cfg, account, stage))


def is_transient(error: BaseException) -> bool:
    """Whether retrying might help: network trouble, not a bad input, config or missing profile."""
    if isinstance(error, ScrapeError):
        return not error.final
    if isinstance(error, (ig.QueryReturnedBadRequestException, ig.QueryReturnedNotFoundException,
                          ig.QueryReturnedForbiddenException)):
        return False  # Instagram answered, and will answer the same again
    return isinstance(error, (ig.ConnectionException, requests.RequestException,
                              httpx.TransportError, ConnectionError, TimeoutError))


def run_settings(settings: dict[str, dict[str, Any]], stages: list[str]) -> dict[str, dict[str, Any]]:
    """The settings of a run of `stages`, with what depends on the run resolved: `[embed]
    with_captions = "auto"` is true when the caption stage runs after embed in it, and
    `with_ocr = "auto"` when the ocr stage does."""
    embed = dict(settings.get("embed", {}))
    for key, stage in (("with_captions", "caption"), ("with_ocr", "ocr")):
        if embed.get(key, "auto") == "auto":
            embed[key] = "embed" in stages and stage in stages
    return {**settings, "embed": embed}
