"""Where the ingest flow's stage tasks run: in the flow's process, or on Dask workers.

`[orchestration] task_runner = "dask"` sends every stage task to a Dask
cluster through prefect-dask: a LocalCluster started for the run
(`dask_address = ""`), or a running scheduler (`dask_address =
"tcp://host:8786"`). Stages still run one after another — each reads what the
last one wrote — so the flow waits for each task before submitting the next.
The account lock stays with the flow process, which holds it for the whole
run; tasks on workers never take it, so they cannot deadlock on it.

A model stage's task splits its to-do list into shard tasks of about
`dask_shard_images` images (shards.py) that run on every worker at once. With
`dask_gpu_resource` set (e.g. "GPU"), each shard task (or, with sharding off, each
model stage's task) needs one unit of that worker resource: start one worker per
GPU with `--resources GPU=1`, and a GPU never runs two models at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from clipgram import dag, shards
from clipgram.config import Config, ConfigError

log = logging.getLogger("clipgram.taskrunner")

# run(task, stage, parameters) -> the task's result; raises what the task raised
RunTask = Callable[[Any, str, dict[str, Any]], Any]


def _task_runner(cfg: Config) -> Any:
    """prefect-dask's DaskTaskRunner for the settings."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError('orchestration.task_runner = "dask" needs prefect-dask: '
                          "pip install 'clipgram[dask]'") from None
    o = cfg.orchestration
    if o.dask_address:
        return DaskTaskRunner(address=o.dask_address)
    kwargs: dict[str, Any] = {"n_workers": o.dask_workers, "processes": o.dask_processes,
                              "threads_per_worker": 1}
    if o.dask_gpu_resource:
        kwargs["resources"] = {o.dask_gpu_resource: 1}  # else model tasks wait forever
    if o.dask_processes:
        # worker processes report task runs to the flow's Prefect API; without its URL,
        # each would start a temporary API of its own that no one sees
        kwargs["env"] = {"PREFECT_API_URL": _api_url()}
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)


def _api_url() -> str:
    """The URL of the Prefect API this process talks to (a temporary one included)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url)


def _resources(cfg: Config, stage: str) -> Any:
    """The Dask annotation a stage's task is submitted under."""
    name = cfg.orchestration.dask_gpu_resource
    if not name or not dag.stage(stage).gpu or shards.sharded(cfg):  # its shards need the GPU, not it
        return nullcontext()
    import dask

    return dask.annotate(resources={name: 1})


@contextmanager
def stage_runner(cfg: Config) -> Iterator[RunTask]:
    """A function that runs one stage task where the settings say, and returns its result."""
    if cfg.orchestration.task_runner == "default":
        yield lambda task, stage, parameters: task(**parameters)
        return
    runner = _task_runner(cfg)
    with runner:
        log.info("stage tasks run on Dask: %s", cfg.orchestration.dask_address
                 or f"a LocalCluster of {cfg.orchestration.dask_workers} worker(s)")

        def run(task: Any, stage: str, parameters: dict[str, Any]) -> Any:
            with _resources(cfg, stage):
                return runner.submit(task, parameters).result()

        yield run
