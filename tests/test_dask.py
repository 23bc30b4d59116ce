"""The Dask task runner: stage tasks on a 2-worker cluster make the tables the default runner makes.

The clusters' workers are threads of the test process (processes=False): two
worker processes would each import torch, open_clip and Prefect on a 2-core
build machine, and the tasks they run are the same either way — prefect-dask
pickles each task with its parameters and runs it on whichever worker is free.
"""

from datetime import datetime

import pytest
from distributed import LocalCluster
from snapshots import assert_same, snapshot

from clipgram import dag, demo, tables
from clipgram.config import ConfigError
from clipgram.flows.ingest import ingest_account, ingest_accounts

A = demo.ACCOUNT
B = "sample-folder"  # the sample's own images as a folder: every image is also one of A's
SETTINGS = {"embed": {"batch_size": 8, "part_rows": 8}, "caption": {"batch_size": 8, "part_rows": 8},
            "decode": {"workers": 0}}


@pytest.fixture(autouse=True)
def no_worker_profiler():
    """Dask's workers sample every thread's stack (`sys._current_frames()`) every 10 ms. In
    threads of this process, on CPython 3.11, a garbage collection inside that call runs
    distributed's gc callback, which lets go of the GIL while the runtime's thread-list lock
    is still held: the next thread to start then waits for that lock while holding the GIL,
    and the whole process hangs (seen once in CI, the download stage's threads all waiting).
    The profile is not what these tests are about."""
    import dask

    with dask.config.set({"distributed.worker.profile.enabled": False}):
        yield


def _span(data_dir, account: str) -> tuple[datetime, datetime]:
    return tables.connect(data_dir).execute(
        "SELECT min(started_at), max(finished_at) FROM runs WHERE account = ? "
        "AND stage IN ('scrape', 'download')", [account]).fetchone()


def test_two_accounts_on_a_two_worker_dask_cluster_make_the_tables_of_the_default_runner(
        prefect_harness, make_config, recorded, tmp_path):
    folder = str(demo.SAMPLE_DIR / "images")
    reference = make_config(tmp_path / "reference", **SETTINGS)
    ingest_account(A, reference.as_dict(), str(recorded))
    ingest_account(B, reference.as_dict(), source=folder)
    expected = snapshot(reference.data_dir)

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      resources={"GPU": 1}, dashboard_address=None) as dask_cluster:
        cfg = make_config(tmp_path / "dask", **SETTINGS, orchestration={
            "task_runner": "dask", "dask_address": dask_cluster.scheduler_address,
            "dask_gpu_resource": "GPU"})
        results = ingest_accounts([A, B], cfg.as_dict(), recorded={A: str(recorded)},
                                  sources={B: folder})
        executed = [w.state.executed_count for w in dask_cluster.workers.values()]
    assert {a: [r.stage for r in rs] for a, rs in results.items()} == {
        A: list(dag.NAMES), B: list(dag.NAMES)}
    # every stage ran on a worker, none in the flow, and A's embed stage sent one shard task;
    # its pass captioned and read text too (nothing was left for the caption and ocr stages,
    # nor for B's: its images are A's)
    assert sum(executed) == 2 * len(dag.NAMES) + 1
    (a_start, a_end), (b_start, b_end) = _span(cfg.data_dir, A), _span(cfg.data_dir, B)
    assert a_start < b_end and b_start < a_end  # the two accounts fetched at the same time

    actual = snapshot(cfg.data_dir)
    assert_same(actual, expected)  # shared images are embedded once, though both accounts have them

    # a rerun on a LocalCluster the runner starts itself finds nothing to do, writes no row twice
    cfg = cfg.replace("orchestration", dask_address="", dask_processes=False, dask_gpu_resource="")
    again = ingest_account(A, cfg.as_dict(), str(recorded))
    assert [r.stage for r in again] == list(dag.NAMES)
    assert sum(r.done for r in again) == 0
    assert snapshot(cfg.data_dir) == actual


def test_a_model_stage_split_into_shards_over_two_workers_makes_the_tables_of_one_task(
        prefect_harness, make_config, recorded, tmp_path):
    # OCR as a stage of its own (as on a GPU host): its shards take no GPU unit. (In the embed
    # stage's pass CLIP's crops would come from OCR's full decode, not libjpeg's draft: the
    # reference runs the same way.)
    settings = {**SETTINGS, "embed": {**SETTINGS["embed"], "with_ocr": False}}
    reference = make_config(tmp_path / "reference", **settings)
    ingest_account(A, reference.as_dict(), str(recorded))
    expected = snapshot(reference.data_dir)

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      resources={"GPU": 1}, dashboard_address=None) as dask_cluster:
        cfg = make_config(tmp_path / "dask", **settings,
                          orchestration={"task_runner": "dask", "dask_address": dask_cluster.scheduler_address,
                                         "dask_gpu_resource": "GPU", "dask_shard_images": 10})
        results = {r.stage: r for r in ingest_account(A, cfg.as_dict(), str(recorded))}
        executed = sum(w.state.executed_count for w in dask_cluster.workers.values())
    images = len(expected["embeddings"])
    shards = -(-images // 10)
    embedded = results["embed"]
    assert embedded.details["shards"] == shards
    # every image once, over the shards, embedded and captioned from one decode
    assert embedded.done == embedded.details["captioned"] == embedded.details["decoded"] == images
    assert results["caption"].done == 0
    assert results["ocr"].details["shards"] == shards and results["ocr"].done == images
    assert executed == len(dag.NAMES) + 2 * shards  # embed's shards and ocr's
    actual = snapshot(cfg.data_dir)  # raw parts: a row written twice would show
    assert_same(actual, expected)
    parts = list((cfg.data_dir / "tables" / "embeddings").rglob("*.parquet"))
    assert len(parts) >= -(-images // 10)  # each shard wrote its own


def test_an_unknown_task_runner_is_a_config_error_naming_the_choices(make_config, tmp_path):
    with pytest.raises(ConfigError, match="orchestration.task_runner: expected one of default, dask"):
        make_config(tmp_path, orchestration={"task_runner": "ray"})


def test_a_failing_account_does_not_stop_the_others_and_fails_the_run_naming_it(
        prefect_harness, make_config, tmp_path):
    """With the default runner: the accounts' fetch threads, and the error handling, are the same."""
    import random

    from clipgram import synthetic

    rng = random.Random(5)
    folder = tmp_path / "scenes"
    folder.mkdir()
    for i, scene in enumerate(rng.sample(synthetic.all_scenes(), 4)):
        synthetic.render(scene, 64, rng).save(folder / f"{i}.png")
    cfg = make_config(tmp_path / "data", **SETTINGS)
    with pytest.raises(RuntimeError, match="ingest failed for broken .*the other accounts finished"):
        ingest_accounts(["broken", "scenes"], cfg.as_dict(),
                        sources={"broken": str(tmp_path / "missing"), "scenes": str(folder)})
    con = tables.connect(cfg.data_dir)
    assert con.execute("SELECT count(*) FROM embeddings").fetchone()[0] == 4
    assert con.execute("SELECT count(*) FROM captions").fetchone()[0] == 4
    failed = con.execute("SELECT stage FROM runs WHERE account = 'broken' AND status = 'failed'").fetchall()
    assert failed == [("scrape",)]
