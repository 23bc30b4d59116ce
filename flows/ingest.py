"""The ingest DAG: scrape → download → embed → caption → publish.

Flows stay thin: every task calls one plain function of `pipeline`, and tasks
take ids, paths and plain settings (never models or connections), so Prefect
can retry, schedule and show them. Idempotency comes from the stages
themselves (each computes its own to-do list from the tables), not from
Prefect's cache.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "clipgram")  # stage logs in the Prefect UI
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # clipgram runs offline too
# stage functions log outside flow runs too (tests, `clipgram status`): that is not an error
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

from prefect import flow, task  # noqa: E402

from pipeline import catalog, download, stages  # noqa: E402
from pipeline.caption import caption  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.embed import embed  # noqa: E402
from pipeline.models import captioner, clip  # noqa: E402
from pipeline.sources import collect  # noqa: E402
from pipeline.sources.instagram import RecordedDataIncomplete  # noqa: E402
from pipeline.sources.session import ScrapeError  # noqa: E402
from pipeline.sources.urls import BadUrlList  # noqa: E402

Settings = dict[str, dict[str, Any]]


def _config(settings: Settings) -> Config:
    return load_config(overrides=settings, environ={})


def _retry_unless_final(task: Any, task_run: Any, state: Any) -> bool:
    # a missing profile, a login wall or a bad input file is the same a minute later
    try:
        state.result()
    except (RecordedDataIncomplete, BadUrlList, FileNotFoundError):
        return False
    except ScrapeError as e:
        return not e.final
    except Exception:
        return True
    return False


@task(name="scrape", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=_retry_unless_final)
def scrape_task(account: str, settings: Settings, recorded: str | None,
                source: str | None = None) -> stages.StageResult:
    cfg = _config(settings)
    return collect(cfg, account, Path(recorded) if recorded else None,
                   Path(source) if source else None)


@task(name="download", retries=2, retry_delay_seconds=[5, 30])
def download_task(account: str, settings: Settings) -> stages.StageResult:
    cfg = _config(settings)
    return download.download(cfg.data_dir, account, download.DownloadSettings.from_config(cfg))


@task(name="embed")
def embed_task(account: str, settings: Settings) -> stages.StageResult:
    cfg = _config(settings)
    return embed(cfg.data_dir, account, cfg)


@task(name="caption")
def caption_task(account: str, settings: Settings) -> stages.StageResult:
    cfg = _config(settings)
    return caption(cfg.data_dir, account, cfg)


@task(name="publish")
def publish_task(account: str, settings: Settings) -> stages.StageResult:
    cfg = _config(settings)
    encoder = clip.from_config(cfg.models)
    model = captioner.from_config(cfg.models, cfg.caption)
    return catalog.publish(cfg.data_dir, encoder.id, encoder.dim, model.id, account)


@flow(name="ingest-account")
def ingest_account(account: str, settings: Settings | None = None,
                   recorded: str | None = None, source: str | None = None) -> list[stages.StageResult]:
    """Ingest one account: Instagram (live, or recorded instaloader JSON in `recorded`),
    or a folder of images or a URL list file (`source`) under the name `account`."""
    settings = settings or load_config().as_dict()
    results = [scrape_task(account, settings, recorded, source), download_task(account, settings)]
    results.append(embed_task(account, settings))
    results.append(caption_task(account, settings))
    results.append(publish_task(account, settings))
    return results
