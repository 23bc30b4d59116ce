"""The ingest DAG: scrape → download → embed → caption → publish.

Flows stay thin: every task calls one plain function of `clipgram`, and tasks
take ids, paths and plain settings (never models or connections), so Prefect
can retry, schedule and show them. Idempotency comes from the stages
themselves (each computes its own to-do list from the tables), not from
Prefect's cache — which is also why retrying a failed flow run from the
Prefect UI is safe: it finishes what is left.
"""

from __future__ import annotations

import contextvars
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

from prefect import Task, flow, task
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff

from clipgram import dag, ledger, rerun, runner, storage, taskrunner
from clipgram.config import Config, load_config
from clipgram.lock import account_lock
from clipgram.result import StageResult

Settings = dict[str, dict[str, Any]]
log = logging.getLogger("clipgram.ingest")


def _config(settings: Settings) -> Config:
    return load_config(overrides=settings, environ={})


@task(task_run_name="{stage}-{account}")
def stage_task(stage: str, run_id: str, account: str, settings: Settings,
               recorded: str | None = None, source: str | None = None) -> StageResult:
    return runner.run_stage(_config(settings), run_id, account, stage, recorded, source)


def _retry_if_transient(task: Task, task_run: Any, state: Any) -> bool:
    return runner.is_transient(state.result(raise_on_failure=False))


def network_options(cfg: Config) -> dict[str, Any]:
    """Retries with exponential backoff and jitter, on transient errors only."""
    o = cfg.orchestration
    return {"retries": o.network_retries,
            "retry_delay_seconds": exponential_backoff(o.retry_delay_s)(o.network_retries),
            "retry_jitter_factor": o.retry_jitter, "retry_condition_fn": _retry_if_transient}


def _run_stages(run: taskrunner.RunTask, cfg: Config, settings: Settings, run_id: str, account: str,
                stages_to_run: list[str], recorded: str | None, source: str | None
                ) -> list[StageResult]:
    """The stages in order, one at a time (each reads what the last wrote), each where `run` puts it."""
    network = stage_task.with_options(**network_options(cfg))
    settings = runner.run_settings(settings, stages_to_run)
    return [run(network if dag.stage(stage).network else stage_task, stage,
                {"stage": stage, "run_id": run_id, "account": account, "settings": settings,
                 "recorded": recorded, "source": source})
            for stage in stages_to_run]


@flow(name="ingest-account")
def ingest_account(account: str, settings: Settings | None = None, recorded: str | None = None,
                   source: str | None = None, stages_to_run: list[str] | None = None,
                   retry_failed: bool = False) -> list[StageResult]:
    """Ingest one account: Instagram (live, or recorded instaloader JSON in `recorded`),
    or a folder of images or a URL list file (`source`) under the name `account`.

    `stages_to_run` (default: all) reruns a subset; `retry_failed` puts failed
    downloads back in the queue first, and has the caption stage take up the images
    whose captioning failed.
    """
    settings = settings or load_config().as_dict()
    cfg = _config(settings)
    todo = [s.name for s in dag.ordered(stages_to_run or list(dag.NAMES))]
    run_id = flow_run.get_id() or uuid.uuid4().hex
    with account_lock(cfg.data_dir, account, cfg.orchestration.lock_wait_s):
        storage.pull(cfg.data_dir)  # an object-store data dir: start from what the store holds
        ledger.open_account(cfg.data_dir, account, cfg.orchestration.ledger_max_parts)
        if retry_failed:
            rerun.requeue_failed(cfg.data_dir, account)
            settings = rerun.retrying_failed_rows(settings)
        with taskrunner.stage_runner(cfg) as run:
            return _run_stages(run, cfg, settings, run_id, account, todo, recorded, source)


@flow(name="ingest-accounts")
def ingest_accounts(accounts: list[str], settings: Settings | None = None,
                    recorded: dict[str, str] | None = None, sources: dict[str, str] | None = None,
                    stages_to_run: list[str] | None = None) -> dict[str, list[StageResult]]:
    """Ingest several accounts in one run, spreading what may run at once over the workers.

    Scrape and download run for every account at the same time: each writes
    only its own account's partitions and content-addressed media. The model
    stages then go one account after another: embeddings and captions are keyed
    by image content and shared by accounts, so their writers take turns anyway
    (`lock.partition_lock`). `recorded` and `sources` map an account
    to its recorded JSON or its folder / URL list, as in `ingest_account`.
    A failed account does not stop the others; the run fails at the end, naming it.
    """
    accounts = list(dict.fromkeys(accounts))
    if not accounts:
        raise ValueError("ingest_accounts needs at least one account")
    settings = settings or load_config().as_dict()
    cfg = _config(settings)
    todo = [s.name for s in dag.ordered(stages_to_run or list(dag.NAMES))]
    run_id = flow_run.get_id() or uuid.uuid4().hex
    results: dict[str, list[StageResult]] = {account: [] for account in accounts}
    errors: dict[str, BaseException] = {}

    def run_account(run: taskrunner.RunTask, account: str, part: list[str]) -> None:
        if account in errors or not part:
            return
        try:
            results[account] += _run_stages(run, cfg, settings, run_id, account, part,
                                            (recorded or {}).get(account), (sources or {}).get(account))
        except Exception as e:  # the ledger and the Prefect UI have the details
            log.error("ingest of %s failed at a stage: %s", account, e)
            errors[account] = e

    with ExitStack() as held:
        # one order for every run, so two runs never each hold a lock the other waits for
        for account in sorted(accounts):
            held.enter_context(account_lock(cfg.data_dir, account, cfg.orchestration.lock_wait_s))
        storage.pull(cfg.data_dir)
        for account in accounts:
            ledger.open_account(cfg.data_dir, account, cfg.orchestration.ledger_max_parts)
        run = held.enter_context(taskrunner.stage_runner(cfg))
        fetch = [stage for stage in todo if dag.stage(stage).network]
        with ThreadPoolExecutor(len(accounts), thread_name_prefix="fetch") as pool:
            # each thread gets its own copy of the flow run's context, which Prefect tasks need
            for account in accounts:
                pool.submit(contextvars.copy_context().run, run_account, run, account, fetch)
        for account in accounts:
            run_account(run, account, [stage for stage in todo if stage not in fetch])
    if errors:
        raise RuntimeError(f"ingest failed for {', '.join(errors)} (see `clipgram status`); "
                           f"the other accounts finished") from next(iter(errors.values()))
    return results
