"""What every stage reports when it ends: counts of items done and failed, and a note."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger("clipgram")


@dataclass
class StageResult:
    stage: str
    account: str
    done: int = 0       # items this run completed
    failed: int = 0     # items this run recorded as failed
    note: str = ""
    details: dict = field(default_factory=dict)  # figures for benchmarks, not the ledger

    def log(self) -> "StageResult":
        extra = f" ({self.note})" if self.note else ""
        log.info("%s %s: %d done, %d failed%s", self.stage, self.account, self.done, self.failed, extra)
        return self
