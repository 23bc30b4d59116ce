"""The ingest DAG: scrape → download → embed → caption → publish.

Flows stay thin: every task calls one plain function of `pipeline`, and tasks
take ids, paths and plain settings (never models or connections), so Prefect
can retry, schedule and show them. Idempotency comes from the stages
themselves (each computes its own to-do list from the tables), not from
Prefect's cache — which is also why retrying a failed flow run from the
Prefect UI is safe: it finishes what is left.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "clipgram")  # stage logs in the Prefect UI
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # clipgram runs offline too
# stage functions log outside flow runs too (tests, `clipgram status`): that is not an error
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

from prefect import Task, flow, task  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402
from prefect.tasks import exponential_backoff  # noqa: E402

from pipeline import cluster, ledger, rerun, runner, stages  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.lock import account_lock  # noqa: E402

Settings = dict[str, dict[str, Any]]


def _config(settings: Settings) -> Config:
    return load_config(overrides=settings, environ={})


@task(task_run_name="{stage}-{account}")
def stage_task(stage: str, run_id: str, account: str, settings: Settings,
               recorded: str | None = None, source: str | None = None) -> stages.StageResult:
    return runner.run_stage(_config(settings), run_id, account, stage, recorded, source)


def _retry_if_transient(task: Task, task_run: Any, state: Any) -> bool:
    return runner.is_transient(state.result(raise_on_failure=False))


def network_options(cfg: Config) -> dict[str, Any]:
    """Retries with exponential backoff and jitter, on transient errors only."""
    o = cfg.orchestration
    return {"retries": o.network_retries,
            "retry_delay_seconds": exponential_backoff(o.retry_delay_s)(o.network_retries),
            "retry_jitter_factor": o.retry_jitter, "retry_condition_fn": _retry_if_transient}


@flow(name="ingest-account")
def ingest_account(account: str, settings: Settings | None = None, recorded: str | None = None,
                   source: str | None = None, stages_to_run: list[str] | None = None,
                   retry_failed: bool = False) -> list[stages.StageResult]:
    """Ingest one account: Instagram (live, or recorded instaloader JSON in `recorded`),
    or a folder of images or a URL list file (`source`) under the name `account`.

    `stages_to_run` (default: all) reruns a subset; `retry_failed` puts failed
    downloads back in the queue first.
    """
    settings = settings or load_config().as_dict()
    cfg = _config(settings)
    todo = rerun.check_stages(stages_to_run or list(stages.STAGES))
    run_id = flow_run.get_id() or uuid.uuid4().hex
    network = stage_task.with_options(**network_options(cfg))
    with account_lock(cfg.data_dir, account, cfg.orchestration.lock_wait_s):
        ledger.open_account(cfg.data_dir, account, cfg.orchestration.ledger_max_parts)
        if retry_failed:
            rerun.requeue_failed(cfg.data_dir, account)
        # one stage at a time, each on a worker under the Dask runner: each reads what the last wrote
        with cluster.stage_runner(cfg) as run:
            return [run(network if stage in runner.NETWORK_STAGES else stage_task, stage,
                        {"stage": stage, "run_id": run_id, "account": account, "settings": settings,
                         "recorded": recorded, "source": source})
                    for stage in todo]
