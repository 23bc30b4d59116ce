"""The runs ledger: every attempt of every stage, as rows of the `runs` table.

An attempt writes a `running` row when it starts and a `completed` or
`failed` row (same attempt_id, newer updated_at) when it ends, so history is
queryable with SQL (`SELECT * FROM runs`) as well as in the Prefect UI. A
process killed mid-stage leaves its `running` row; the next run of the
account (which holds the account lock, so no one else is running) marks it
`interrupted`.

The ledger also makes no-op reruns fast: a completed attempt records a
fingerprint of its inputs, and when the next attempt finds the same
fingerprint it is `skipped` without loading a model or reading a row.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipgram import doctor, storage, tables
from clipgram.result import StageResult

log = logging.getLogger("clipgram.ledger")

ERROR_CHARS = 2000  # a traceback's last line is the useful part; keep rows small


def _write(data_dir: Path, account: str, rows: list[dict[str, Any]]) -> None:
    tables.write_part(data_dir, tables.RUNS, account, rows)


def _last_finished(data_dir: Path, account: str, stage: str) -> dict[str, Any] | None:
    con = tables.connect(data_dir)
    row = con.execute(
        "SELECT status, inputs, run_id FROM runs WHERE account = ? AND stage = ? "
        "AND status <> 'running' ORDER BY started_at DESC LIMIT 1", [account, stage]).fetchone()
    return dict(zip(("status", "inputs", "run_id"), row)) if row else None


def record(data_dir: Path, run_id: str, account: str, stage: str,
           work: Callable[[], StageResult], inputs: Callable[[], str] | None = None) -> StageResult:
    """Run `work` as one recorded attempt of `stage`.

    With `inputs` (a fingerprint function), the attempt is skipped when the
    last finished attempt completed on the same fingerprint.
    """
    row: dict[str, Any] = {
        "attempt_id": uuid.uuid4().hex, "run_id": run_id, "stage": stage, "status": "running",
        "started_at": tables.now(), "host": socket.gethostname(), "pid": os.getpid()}
    if inputs is not None:
        before = inputs()
        last = _last_finished(data_dir, account, stage)
        if last and last["status"] in ("completed", "skipped") and last["inputs"] == before:
            note = "skipped: inputs unchanged since the last completed run"
            _write(data_dir, account, [{**row, "status": "skipped", "finished_at": tables.now(),
                                        "done": 0, "failed": 0, "note": note, "inputs": before}])
            return StageResult(stage, account, note=note).log()
    _write(data_dir, account, [row])
    try:
        with doctor.naming_unreadable():  # the failure names the table file and what to do
            result = work()
    except BaseException as e:  # KeyboardInterrupt and SystemExit end an attempt too
        error = f"{type(e).__name__}: {e}"[-ERROR_CHARS:]
        _write(data_dir, account, [{**row, "status": "failed", "finished_at": tables.now(),
                                    "error": error}])
        raise
    _write(data_dir, account, [{
        **row, "status": "completed", "finished_at": tables.now(), "done": result.done,
        "failed": result.failed, "note": result.note,
        "inputs": inputs() if inputs is not None else None}])
    return result


def open_account(data_dir: Path, account: str, max_parts: int = 64) -> None:
    """Tidy the account's ledger before a run. Call only while holding the account lock.

    Attempts still `running` belong to processes that died (the lock proves no
    one else is running): they become `interrupted`. When the ledger has grown
    past `max_parts` parts, its rows are rewritten as one part, so months of
    scheduled runs do not become thousands of tiny files. Temp files that killed
    runs left in the tables go too.
    """
    removed = tables.remove_stale_temp_files(data_dir / "tables")
    if removed:
        log.info("%d temp file(s) of killed runs removed from the tables", removed)
    con = tables.connect(data_dir)
    stale = tables.rows(con, tables.RUNS, "account = ? AND status = 'running'", [account])
    if stale:
        error = "interrupted: the process ended before the stage finished (killed or crashed)"
        _write(data_dir, account, [{**r, "status": "interrupted", "error": error} for r in stale])
        log.warning("%d stage attempt(s) of %s were interrupted; marked in the runs ledger",
                    len(stale), account)
    directory = tables.RUNS.dir(data_dir) / f"account={account}"
    parts = sorted(directory.glob("*.parquet"))
    if len(parts) <= max_parts:
        return
    rows = tables.rows(tables.connect(data_dir), tables.RUNS, "account = ?", [account])
    # the merged part is newer than every old one, so readers that see both still
    # resolve each attempt to the same row; then the old parts go
    _write(data_dir, account, rows)
    storage.remove(parts)
    log.info("runs ledger of %s compacted: %d parts into one", account, len(parts))
