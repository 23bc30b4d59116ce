"""Scheduled ingestion: accounts.toml → one served Prefect deployment per account; prefect.yaml."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from clipgram import schedule
from clipgram.config import ConfigError
from clipgram.flows import deploy

ROOT = Path(__file__).resolve().parent.parent
ACCOUNTS = """
[defaults]
cron = "0 */6 * * *"

[[account]]
name = "alpha"
cron = "15 * * * *"
limit = 5

[[account]]
name = "beta"
interval = "30m"
clip_model = "tiny"
settings = { download = { concurrency = 2 } }

[[account]]
name = "gamma"
"""


@pytest.fixture
def accounts_file(tmp_path):
    path = tmp_path / "accounts.toml"
    path.write_text(ACCOUNTS)
    return path


def test_accounts_file_gives_each_account_its_schedule_and_settings(accounts_file, make_config, tmp_path):
    accounts = {a.name: a for a in schedule.load_accounts(accounts_file)}
    assert accounts["alpha"].cron == "15 * * * *" and accounts["alpha"].settings == {"scrape": {"limit": 5}}
    assert accounts["beta"].interval == timedelta(minutes=30) and accounts["beta"].cron is None
    assert accounts["gamma"].cron == "0 */6 * * *"  # from [defaults]

    cfg = make_config(tmp_path / "data")
    deployments = {d.name: d for d in deploy.deployments(list(accounts.values()), cfg)}
    assert sorted(deployments) == ["ingest-alpha", "ingest-beta", "ingest-gamma"]
    alpha, beta = deployments["ingest-alpha"], deployments["ingest-beta"]
    assert alpha.schedules[0].schedule.cron == "15 * * * *"
    assert beta.schedules[0].schedule.interval == timedelta(minutes=30)
    assert alpha.parameters["account"] == "alpha"
    assert alpha.parameters["settings"]["scrape"]["limit"] == 5
    assert beta.parameters["settings"]["download"]["concurrency"] == 2
    assert beta.parameters["settings"]["models"]["clip"] == "tiny"
    assert alpha.parameters["settings"]["data"]["dir"] == str(cfg.data_dir)


@pytest.mark.parametrize("text, message", [
    ('[[account]]\nname = "x"\ncron = "every hour"', "Invalid cron"),
    ('[[account]]\nname = "x"', "one schedule"),
    ('[[account]]\nname = "x"\ncron = "* * * * *"\ninterval = 60', "one schedule"),
    ('[[account]]\nname = "../x"\ncron = "* * * * *"', "cannot name a partition"),
    ('[[account]]\nname = "x"\ncron = "* * * * *"\nlimt = 3', "unknown key"),
    ('[[account]]\nname = "x"\ncron = "* * * * *"\nsettings = { scrape = { limit = "many" } }', "scrape.limit"),
    ('[[account]]\nname = "x"\ninterval = "soon"', "not a duration"),
    ('[[account]]\nname = "x"\ncron = "* * * * *"\n[[account]]\nname = "x"\ncron = "* * * * *"', "twice"),
])
def test_a_bad_accounts_file_says_which_account_and_why(tmp_path, text, message):
    path = tmp_path / "accounts.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        schedule.load_accounts(path)


def test_shipped_accounts_file_loads():
    assert schedule.load_accounts(ROOT / "configs" / "accounts.toml")


def test_prefect_yaml_deploys_the_ingest_flow():
    from prefect.flows import load_flow_from_entrypoint
    from prefect.schedules import validate_cron_string

    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for deployment in doc["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        flow = load_flow_from_entrypoint(str(ROOT / path) + ":" + name)
        assert flow.name == "ingest-account"
        assert set(deployment["parameters"]) <= set(flow.parameters.properties)
        assert {"account"} <= set(deployment["parameters"])
        for s in deployment["schedules"]:
            validate_cron_string(s["cron"])


async def _served(names: list[str], deadline: float) -> dict:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        while True:
            found = {}
            for name in names:
                try:
                    found[name] = await client.read_deployment_by_name(f"ingest-account/{name}")
                except Exception:
                    break
            if len(found) == len(names) or time.monotonic() > deadline:
                return found
            await asyncio.sleep(1)


def test_serve_registers_one_scheduled_deployment_per_account(prefect_harness, accounts_file, tmp_path):
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipgram.cli", "serve", "--accounts", str(accounts_file),
         "--data-dir", str(tmp_path / "data")], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        found = asyncio.run(_served(["ingest-alpha", "ingest-beta", "ingest-gamma"],
                                    time.monotonic() + 120))
        assert proc.poll() is None, proc.stdout.read()  # still serving
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert sorted(found) == ["ingest-alpha", "ingest-beta", "ingest-gamma"]
    alpha = found["ingest-alpha"]
    assert alpha.parameters["account"] == "alpha"
    assert [s.schedule.cron for s in alpha.schedules] == ["15 * * * *"]
    assert [s.schedule.interval for s in found["ingest-beta"].schedules] == [timedelta(minutes=30)]
