"""What every stage reports, and where each account stands in each stage."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline import tables

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


def status(data_dir: Path, clip_id: str | None, captioner_id: str | None) -> list[dict]:
    """Per account and stage: done / pending / failed counts and the last error."""
    con = tables.connect(data_dir)
    emb = tables.scan_sql(tables.EMBEDDINGS, data_dir, str(data_dir), clip_id or "none")
    cap = tables.scan_sql(tables.CAPTIONS, data_dir, str(data_dir), captioner_id or "none")
    return [dict(zip(("account", "stage", "done", "pending", "failed", "last_error"), row))
            for row in con.execute(f"""
        WITH images AS (SELECT DISTINCT account, sha256 FROM media WHERE status = 'done'),
        emb AS (SELECT DISTINCT sha256 FROM ({emb})),
        cap AS (SELECT sha256, any_value(error) AS error FROM ({cap}) GROUP BY sha256),
        counts(account, stage, done, pending, failed, last_error) AS (
        SELECT account, 'scrape', count(*), 0, 0, NULL FROM posts GROUP BY account
        UNION ALL
        SELECT account, 'download', count(*) FILTER (status = 'done'),
               count(*) FILTER (status = 'pending'), count(*) FILTER (status = 'failed'),
               max_by(error, updated_at) FILTER (status = 'failed')
        FROM media GROUP BY account
        UNION ALL
        SELECT account, 'embed', count(emb.sha256), count(*) - count(emb.sha256), 0, NULL
        FROM images LEFT JOIN emb USING (sha256) GROUP BY account
        UNION ALL
        SELECT account, 'caption', count(cap.sha256) FILTER (cap.error IS NULL),
               count(*) - count(cap.sha256), count(cap.error), any_value(cap.error)
        FROM images LEFT JOIN cap USING (sha256) GROUP BY account)
        SELECT * FROM counts
        ORDER BY account, array_position(['scrape', 'download', 'embed', 'caption'], stage)
    """).fetchall()]
