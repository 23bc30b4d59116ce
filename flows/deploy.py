"""Deploying the ingest flow: one Prefect deployment per account of an accounts.toml.

`clipgram serve` serves them with prefect.serve; prefect.yaml deploys the same flow to a
work pool instead. What an accounts.toml says is read (and checked) by clipgram.schedule.
"""

from __future__ import annotations

import prefect
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron, Interval

from clipgram import schedule
from clipgram.config import Config, load_config
from clipgram.flows.ingest import ingest_account


def deployments(accounts: list[schedule.Account], cfg: Config) -> list[RunnerDeployment]:
    """One Prefect deployment of the ingest flow per account, with its schedule and settings."""
    out = []
    for account in accounts:
        base = cfg.as_dict()
        for section, values in account.settings.items():
            base[section].update(values)
        settings = load_config(overrides=base, environ={}).as_dict()
        when = (Cron(account.cron, timezone=account.timezone) if account.cron
                else Interval(account.interval, timezone=account.timezone))
        out.append(ingest_account.to_deployment(
            name=account.deployment_name, schedule=when, paused=account.paused,
            parameters={"account": account.name, "settings": settings, "recorded": account.recorded},
            tags=["clipgram", f"account:{account.name}"],
            description=f"Ingest Instagram account {account.name} on a schedule",
            concurrency_limit=1))  # runs of one account queue up instead of colliding
    return out


def serve(deployments: list[RunnerDeployment], limit: int | None = None) -> None:
    """Serve the deployments until interrupted (Ctrl-C)."""
    prefect.serve(*deployments, limit=limit)
