"""Where each account stands in each stage: done, pending and failed items, the last run."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from clipgram import tables
from clipgram.dag import NAMES

COLUMNS = ("account", "stage", "done", "pending", "failed", "last_run", "last_run_at",
                  "last_error")


def _alive(host: str | None, pid: int | None) -> bool:
    """Whether the process that wrote a `running` ledger row is still alive (as far as we can tell)."""
    if host != socket.gethostname() or pid is None:
        return True  # another machine's process: assume it is
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def rows(data_dir: Path, clip_id: str | None, captioner_id: str | None,
         ocr_id: str | None = None) -> list[dict]:
    """Per account and stage: done / pending / failed items, the last run and the last error.

    `last_run` is the stage's latest attempt in the runs ledger (completed,
    skipped, failed, running, or interrupted when its process is gone);
    `last_error` is that attempt's error, else the latest failed item's.
    """
    con = tables.connect(data_dir)
    emb = tables.scan_sql(tables.EMBEDDINGS, data_dir, str(data_dir), clip_id or "none")
    # the newest row per image: a caption retried after a failure counts as done
    cap = tables.latest_sql(tables.CAPTIONS, data_dir, str(data_dir), captioner_id or "none")
    ocr = tables.latest_sql(tables.OCR, data_dir, str(data_dir), ocr_id or "none")
    found = [dict(zip((*COLUMNS, "host", "pid"), row)) for row in con.execute(f"""
        WITH images AS (SELECT DISTINCT account, sha256 FROM media WHERE status = 'done'),
        emb AS (SELECT sha256, bool_or(embedding IS NOT NULL) AS ok, any_value(error) AS error
                FROM ({emb}) GROUP BY sha256),
        cap AS (SELECT sha256, any_value(error) AS error FROM ({cap}) GROUP BY sha256),
        ocr AS (SELECT sha256, any_value(error) AS error FROM ({ocr}) GROUP BY sha256),
        counts(account, stage, done, pending, failed, last_error) AS (
        SELECT account, 'scrape', count(*), 0, 0, NULL FROM posts GROUP BY account
        UNION ALL
        SELECT account, 'download', count(*) FILTER (status = 'done'),
               count(*) FILTER (status = 'pending'), count(*) FILTER (status = 'failed'),
               max_by(error, updated_at) FILTER (status = 'failed')
        FROM media GROUP BY account
        UNION ALL
        SELECT account, 'embed', count(*) FILTER (emb.ok), count(*) - count(emb.sha256),
               count(*) FILTER (NOT emb.ok), any_value(emb.error) FILTER (NOT emb.ok)
        FROM images LEFT JOIN emb USING (sha256) GROUP BY account
        UNION ALL
        SELECT account, 'caption', count(cap.sha256) FILTER (cap.error IS NULL),
               count(*) - count(cap.sha256), count(cap.error), any_value(cap.error)
        FROM images LEFT JOIN cap USING (sha256) GROUP BY account
        UNION ALL  -- only when the catalog reads an OCR model's text
        SELECT account, 'ocr', count(ocr.sha256) FILTER (ocr.error IS NULL),
               count(*) - count(ocr.sha256), count(ocr.error), any_value(ocr.error)
        FROM images LEFT JOIN ocr USING (sha256) WHERE {ocr_id is not None} GROUP BY account),
        -- stages without items of their own (publish, analyse): what their last completed run did
        did AS (SELECT account, stage, done FROM runs WHERE status = 'completed'
                QUALIFY row_number() OVER (PARTITION BY account, stage ORDER BY started_at DESC) = 1),
        last AS (SELECT account, stage, status, coalesce(finished_at, started_at) AS at, error,
                        host, pid FROM runs
                 QUALIFY row_number() OVER (PARTITION BY account, stage ORDER BY started_at DESC) = 1)
        SELECT account, stage, coalesce(c.done, d.done, 0), coalesce(c.pending, 0), coalesce(c.failed, 0),
               l.status, l.at, coalesce(l.error, c.last_error), l.host, l.pid
        FROM counts c FULL JOIN last l USING (account, stage) LEFT JOIN did d USING (account, stage)
        ORDER BY account, array_position({list(NAMES)}, stage)
    """).fetchall()]
    for row in found:
        host, pid = row.pop("host"), row.pop("pid")
        if row["last_run"] == "running" and not _alive(host, pid):
            row["last_run"] = "interrupted"
    return found
