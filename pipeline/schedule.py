"""Scheduled ingestion: configs/accounts.toml → one Prefect deployment per account.

    [defaults]                      # optional: what every account gets
    cron = "0 */6 * * *"
    [[account]]
    name = "nasa"
    cron = "0 * * * *"              # or: interval = "30m" (s, m, h, d) or seconds
    limit = 50                      # shorthand for settings.scrape.limit
    clip_model = "ViT-B-32:laion2b_s34b_b79k"   # shorthand for settings.models.clip
    settings = { download = { concurrency = 4 } }   # any [section] key of default.toml

`clipgram serve` builds the deployments (clipgram.flows.deploy) and serves them (prefect.serve)
against the Prefect API: the ephemeral one by default, a `prefect server
start` when PREFECT_API_URL is set. Each run gets the settings resolved when
serve started, so edit the file and restart serve to change them.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from clipgram import tables
from clipgram.config import ConfigError, load_config

SHORTHANDS = {"limit": ("scrape", "limit"), "clip_model": ("models", "clip"),
              "captioner": ("models", "captioner")}
ACCOUNT_KEYS = {"name", "cron", "interval", "timezone", "paused", "recorded", "settings", *SHORTHANDS}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Account:
    name: str
    cron: str | None = None
    interval: timedelta | None = None
    timezone: str | None = None
    paused: bool = False
    recorded: str | None = None      # instaloader JSON instead of Instagram (demos, tests)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def deployment_name(self) -> str:
        return f"ingest-{self.name}"


def _interval(value: Any, where: str) -> timedelta:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return timedelta(seconds=value)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", str(value))
    if not match:
        raise ConfigError(f"{where}: interval {value!r} is not a duration like 90, \"30m\", \"6h\", \"1d\"")
    return timedelta(seconds=float(match[1]) * _UNITS[match[2]])


def _account(entry: dict[str, Any], defaults: dict[str, Any], where: str) -> Account:
    merged = {**defaults, **entry}
    unknown = set(merged) - ACCOUNT_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(sorted(ACCOUNT_KEYS))}")
    if "name" not in entry:
        raise ConfigError(f"{where}: every [[account]] needs a name")
    try:
        name = tables.check_partition_value(str(entry["name"]))
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    # the account's own schedule, of either kind, wins over the default one
    when = ({k: entry[k] for k in ("cron", "interval") if k in entry}
            or {k: defaults[k] for k in ("cron", "interval") if k in defaults})
    if len(when) != 1:
        raise ConfigError(f"{where}: give the account one schedule, a cron or an interval "
                          "(or one in [defaults])")
    cron, interval = when.get("cron"), when.get("interval")
    if cron is not None:
        from prefect.schedules import validate_cron_string

        try:
            validate_cron_string(str(cron))
        except ValueError as e:
            raise ConfigError(f"{where}: {e} (expected \"minute hour day month weekday\")") from None
    settings: dict[str, dict[str, Any]] = {s: dict(v) for s, v in merged.get("settings", {}).items()}
    for key, (section, setting) in SHORTHANDS.items():
        if key in merged:
            settings.setdefault(section, {})[setting] = merged[key]
    try:
        load_config(overrides=settings, environ={})  # fail now, not at 3 a.m.
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return Account(name, cron, _interval(interval, where) if interval is not None else None,
                   merged.get("timezone"), bool(merged.get("paused", False)),
                   merged.get("recorded"), settings)


def load_accounts(path: Path) -> list[Account]:
    """The accounts of an accounts.toml, checked: ConfigError says which entry and why."""
    if not path.exists():
        raise ConfigError(f"accounts file {path} does not exist (copy configs/accounts.toml)")
    with open(path, "rb") as f:
        try:
            doc = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from None
    defaults = doc.get("defaults", {})
    accounts = [_account(entry, defaults, f"{path} account #{i + 1}")
                for i, entry in enumerate(doc.get("account", []))]
    names = [a.name for a in accounts]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{path}: account(s) listed twice: {', '.join(duplicates)}")
    if not accounts:
        raise ConfigError(f"{path} lists no [[account]]: add one (see the comments in it)")
    return accounts
