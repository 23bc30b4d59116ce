"""The Dask task runner: stage tasks on a 2-worker cluster make the tables the default runner makes.

The cluster's workers are threads of the test process (processes=False): two
worker processes would each import torch, open_clip and Prefect on a 2-core
build machine, and the tasks they run are the same either way — prefect-dask
pickles each task with its parameters and runs it on whichever worker is free.
"""

import numpy as np
import pytest
from distributed import LocalCluster
from snapshots import snapshot

from flows.ingest import ingest_account
from pipeline import demo, stages
from pipeline.config import ConfigError

A = demo.ACCOUNT
SETTINGS = {"embed": {"batch_size": 8, "part_rows": 8}, "caption": {"batch_size": 8},
            "decode": {"workers": 0}}


def test_a_two_worker_dask_cluster_makes_the_tables_of_the_default_runner(
        prefect_harness, make_config, recorded, tmp_path):
    reference = make_config(tmp_path / "reference", **SETTINGS)
    ingest_account(A, reference.as_dict(), str(recorded))
    expected = snapshot(reference.data_dir)

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      resources={"GPU": 1}, dashboard_address=None) as dask_cluster:
        cfg = make_config(tmp_path / "dask", **SETTINGS, orchestration={
            "task_runner": "dask", "dask_address": dask_cluster.scheduler_address,
            "dask_gpu_resource": "GPU"})
        results = ingest_account(A, cfg.as_dict(), str(recorded))
        executed = [w.state.executed_count for w in dask_cluster.workers.values()]
    assert [r.stage for r in results] == list(stages.STAGES)
    assert sum(executed) == len(stages.STAGES)  # every stage ran on a worker, none in the flow

    actual = snapshot(cfg.data_dir)
    for table in ("posts", "media", "captions", "documents"):
        assert actual[table] == expected[table], table
    assert [r[:2] for r in actual["embeddings"]] == [r[:2] for r in expected["embeddings"]]
    np.testing.assert_allclose(np.array([r[2] for r in actual["embeddings"]]),
                               np.array([r[2] for r in expected["embeddings"]]), atol=1e-5)

    # a rerun on the cluster finds nothing to do and writes no row twice
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as dask_cluster:
        cfg.orchestration.dask_address = dask_cluster.scheduler_address
        cfg.orchestration.dask_gpu_resource = ""
        again = ingest_account(A, cfg.as_dict(), str(recorded))
    assert sum(r.done for r in again) == 0
    assert snapshot(cfg.data_dir) == actual


def test_an_unknown_task_runner_is_a_config_error_naming_the_choices(make_config, tmp_path):
    with pytest.raises(ConfigError, match="orchestration.task_runner: expected one of default, dask"):
        make_config(tmp_path, orchestration={"task_runner": "ray"})
