"""The README's cluster recipe, run as written: a `dask scheduler`, a GPU worker and a CPU
worker (`dask worker` processes), `clipgram ingest` pointed at the scheduler by environment
variables, and an object-store data directory (S3 on 127.0.0.1). Its tables equal a local run's."""

import os
import socket
import subprocess
import sys
import time

from conftest import BUCKET, as_toml
from snapshots import assert_same, snapshot

from clipgram import dag, demo, storage
from clipgram.flows.ingest import ingest_account

SETTINGS = {"embed": {"batch_size": 8, "part_rows": 8}, "caption": {"batch_size": 8, "part_rows": 8},
            "decode": {"workers": 0}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_readme_cluster_recipe_on_two_dask_worker_processes_and_s3(
        prefect_harness, make_config, recorded, s3, tmp_path):
    from distributed import Client
    from prefect.settings import PREFECT_API_URL

    options, _ = s3
    reference = make_config(tmp_path / "reference", **SETTINGS)
    ingest_account(demo.ACCOUNT, reference.as_dict(), str(recorded))
    expected = snapshot(reference.data_dir)

    address = f"tcp://127.0.0.1:{_free_port()}"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONUNBUFFERED": "1"}
    logs = tmp_path / "logs"
    logs.mkdir()
    commands = {  # the README's, on one machine
        "scheduler": ["dask", "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                      "--no-dashboard"],
        "gpu-worker": ["dask", "worker", address, "--nworkers", "1", "--nthreads", "1", "--resources", "GPU=1",
                       "--no-dashboard"],
        "cpu-worker": ["dask", "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard"],
    }
    bin_dir = os.path.dirname(sys.executable)
    processes = []
    try:
        for name, command in commands.items():
            processes.append(subprocess.Popen([os.path.join(bin_dir, command[0]), *command[1:]], env=env,
                                              stdout=open(logs / f"{name}.log", "w"), stderr=subprocess.STDOUT))
            if name == "scheduler":
                time.sleep(1)
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
            url = f"s3://{BUCKET}/cluster"
            config = tmp_path / "cluster.toml"
            config.write_text(as_toml({
                "data": {"dir": url, "cache_dir": str(tmp_path / "mirror"), "storage_options": options},
                "models": {"clip": "tiny", "captioner": "tiny", "device": "cpu",
                           "cache_dir": str(reference.models.cache_dir)},
                "download": {"allow_private_network": True}, **SETTINGS,
                "orchestration": {"dask_shard_images": 10}}))
            run = subprocess.run(
                [sys.executable, "-m", "clipgram.cli", "ingest", demo.ACCOUNT, "--recorded", str(recorded),
                 "--config", str(config)],
                env={**env, "CLIPGRAM_ORCHESTRATION_TASK_RUNNER": "dask",
                     "CLIPGRAM_ORCHESTRATION_DASK_ADDRESS": address,
                     "CLIPGRAM_ORCHESTRATION_DASK_GPU_RESOURCE": "GPU"},
                capture_output=True, text=True, timeout=600)
            assert run.returncode == 0, run.stdout + run.stderr
            executed = dict(client.run(lambda dask_worker: (dask_worker.state.total_resources.get("GPU", 0),
                                                            dask_worker.state.executed_count)).values())
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(timeout=30)

    shards = -(-len(expected["embeddings"]) // 10)
    # every stage ran on a worker; the embed stage's shards on the GPU worker, which captioned
    # and read text too (every model here runs on the CPU: on a GPU host the ocr stage would
    # send its own shards, which need no GPU)
    assert sum(executed.values()) == len(dag.NAMES) + shards
    assert executed[1] >= shards

    # a machine with an empty mirror reads the store: the tables of the local run
    check = make_config(url, data={"cache_dir": str(tmp_path / "check"), "storage_options": options})
    storage.pull(check.data_dir)
    actual = snapshot(check.data_dir, catalog=False)
    assert_same(actual, expected)
