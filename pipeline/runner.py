"""One stage of one account, by name: what it runs, what its inputs are, and its ledger entry.

This is what the Prefect tasks call (flows/ingest.py), and it is plain code a
test can drive without Prefect.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import requests
from instaloader import exceptions as ig

from clipgram import catalog, download, ledger, stages, storage, tables
from clipgram.caption import caption
from clipgram.config import Config
from clipgram.embed import embed
from clipgram.models import captioner, clip
from clipgram.sources import collect
from clipgram.sources.session import ScrapeError

# stages that talk to the network and may retry on transient errors; the others
# fail the same way every time on the same input, so retrying only costs time
NETWORK_STAGES = ("scrape", "download")

# where scrape reads from: (recorded instaloader JSON dir, folder or URL list); both None: Instagram
Origin = tuple[str | None, str | None]


def _scrape(cfg: Config, account: str, origin: Origin) -> stages.StageResult:
    recorded, source = origin
    return collect(cfg, account, Path(recorded) if recorded else None,
                   Path(source) if source else None)


def _download(cfg: Config, account: str, origin: Origin) -> stages.StageResult:
    return download.download(cfg.data_dir, account, download.DownloadSettings.from_config(cfg))


def _publish(cfg: Config, account: str, origin: Origin) -> stages.StageResult:
    encoder = clip.from_config(cfg.models)
    model = captioner.from_config(cfg.models, cfg.caption)
    return catalog.publish(cfg.data_dir, encoder.id, encoder.dim, model.id, account)


WORK: dict[str, Callable[[Config, str, Origin], stages.StageResult]] = {
    "scrape": _scrape,
    "download": _download,
    "embed": lambda cfg, account, _: embed(cfg.data_dir, account, cfg),
    "caption": lambda cfg, account, _: caption(cfg.data_dir, account, cfg),
    "publish": _publish,
}
assert tuple(WORK) == stages.STAGES


def inputs(cfg: Config, account: str, stage: str) -> Callable[[], str] | None:
    """The fingerprint of what `stage` reads and writes for `account`; None: always run.

    Scrape reads Instagram, which has no fingerprint. The model stages include
    their output tables, so deleting parts (or another account adding shared
    images) makes them look again.
    """
    media = f"{tables.MEDIA.name}/{tables.MEDIA.parts(account)}"
    globs = {
        "download": [media],
        "embed": [media, f"{tables.EMBEDDINGS.name}/**/*.parquet"],
        "caption": [media, f"{tables.CAPTIONS.name}/**/*.parquet"],
        "publish": [f"{t.name}/**/*.parquet" for t in tables.ALL_TABLES if t is not tables.RUNS],
    }.get(stage)
    if globs is None:
        return None
    # what each stage's output depends on besides its inputs (embed: its retry_failed too)
    settings = {"download": (), "embed": (vars(cfg.models), vars(cfg.embed))}.get(
        stage, (vars(cfg.models), vars(cfg.caption)))
    return lambda: tables.fingerprint(cfg.data_dir, globs, *settings)


def run_stage(cfg: Config, run_id: str, account: str, stage: str,
              recorded: str | None = None, source: str | None = None) -> stages.StageResult:
    """Run `stage` for `account`, recorded in the runs ledger, skipped when its inputs are unchanged."""
    if stage not in WORK:
        raise ValueError(f"unknown stage {stage!r}: one of {', '.join(stages.STAGES)}")
    storage.pull(cfg.data_dir)  # on another machine (Dask), or after one: the store's tables
    return ledger.run_stage(cfg.data_dir, run_id, account, stage,
                            lambda: WORK[stage](cfg, account, (recorded, source)), inputs(cfg, account, stage))


def is_transient(error: BaseException) -> bool:
    """Whether retrying might help: network trouble, not a bad input, config or missing profile."""
    if isinstance(error, ScrapeError):
        return not error.final
    if isinstance(error, (ig.QueryReturnedBadRequestException, ig.QueryReturnedNotFoundException,
                          ig.QueryReturnedForbiddenException)):
        return False  # Instagram answered, and will answer the same again
    return isinstance(error, (ig.ConnectionException, requests.RequestException,
                              httpx.TransportError, ConnectionError, TimeoutError))
