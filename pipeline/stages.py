"""What every stage reports, and where each account stands in each stage."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("clipgram")

STAGES = ("scrape", "download", "embed", "caption", "publish")


@dataclass
class StageResult:
    stage: str
    account: str
    done: int = 0       # items this run completed
    failed: int = 0     # items this run recorded as failed
    note: str = ""

    def log(self) -> "StageResult":
        extra = f" ({self.note})" if self.note else ""
        log.info("%s %s: %d done, %d failed%s", self.stage, self.account, self.done, self.failed, extra)
        return self
