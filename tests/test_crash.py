"""Crash safety: SIGKILL the ingest at several points, rerun, get the tables of an uninterrupted run.

The killed runs are real `clipgram ingest` processes (tests/crash_driver.py
kills them from inside at a chosen point, so the point is exact). They run one
after another on the same data directory, each resuming what the last left;
after every kill, every file a reader can see must be whole, and the next
process must get the account's lock at once.
"""

import subprocess
from pathlib import Path

import crash_driver
import pyarrow.parquet as pq
from snapshots import assert_same
from snapshots import snapshot as _snapshot

from clipgram import catalog, demo, status, tables
from clipgram.flows.ingest import ingest_account

A = demo.ACCOUNT
SETTINGS = {"embed": {"batch_size": 8, "part_rows": 8}, "caption": {"batch_size": 8, "part_rows": 8},
            "decode": {"workers": 0}}


def _kill_at(point: str, nth: int, cfg, recorded: Path) -> None:
    argv, env = crash_driver.command(cfg, recorded, point, str(nth))
    proc = subprocess.run(argv, cwd=crash_driver.ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, f"{point}: not killed (rc {proc.returncode})\n{proc.stderr[-3000:]}"


def _readers_see_whole_files(data_dir: Path) -> None:
    for part in (data_dir / "tables").rglob("*.parquet"):
        pq.read_table(part)  # raises on a torn file
    con = tables.connect(data_dir)
    for table in tables.ALL_TABLES:
        con.execute(f"SELECT count(*) FROM {table.name}").fetchone()
    if (data_dir / catalog.CATALOG).exists():
        catalog.connect(data_dir).execute("SELECT count(*) FROM images").fetchone()


def test_sigkill_at_any_point_then_rerun_equals_an_uninterrupted_run(
        prefect_harness, make_config, recorded, tmp_path):
    reference = make_config(tmp_path / "reference", **SETTINGS)
    ingest_account(A, reference.as_dict(), str(recorded))
    expected = _snapshot(reference.data_dir)
    images = len(expected["embeddings"])
    assert images > 24  # enough for the embed kills below to land mid-stage

    cfg = make_config(tmp_path / "data", **SETTINGS)
    data = cfg.data_dir
    con = lambda: tables.connect(data)  # noqa: E731 - fresh view of the parts each time
    emb = lambda: tables.scan_sql(tables.EMBEDDINGS, data, str(data))  # noqa: E731

    _kill_at("download", 10, cfg, recorded)
    _readers_see_whole_files(data)
    # media rows are flushed at the end of the stage: all are still pending, some files stored
    assert con().execute("SELECT count(*) FILTER (status = 'done') FROM media").fetchone() == (0,)
    assert 0 < sum(1 for _ in (data / "media").rglob("*.jpg")) < images
    # status knows the killed process is gone
    assert {r["stage"]: r["last_run"] for r in status.rows(data, None, None)}["download"] == "interrupted"

    _kill_at("embed", 3, cfg, recorded)
    _readers_see_whole_files(data)
    # the first batch landed; the second was still in flight (one stays queued on the device)
    assert con().execute(f"SELECT count(*) FROM ({emb()})").fetchone() == (8,)

    _kill_at("parquet", 2, cfg, recorded)
    _readers_see_whole_files(data)
    assert list((tables.EMBEDDINGS.dir(data)).rglob(".part-*.tmp"))  # the torn write stayed hidden
    assert con().execute(f"SELECT count(*) FROM ({emb()})").fetchone() == (16,)  # one more part

    _kill_at("catalog", 1, cfg, recorded)
    _readers_see_whole_files(data)
    assert not (data / catalog.CATALOG).exists() and (data / f".{catalog.CATALOG}.tmp").exists()

    # the rerun takes the lock the killed processes held, and finishes the rest
    results = {r.stage: r for r in ingest_account(A, cfg.as_dict(), str(recorded))}
    assert results["embed"].done == 0 and results["caption"].done == 0  # finished by the last kill's run
    actual = _snapshot(data)
    assert_same(actual, expected)

    # the ledger tells the story: four interrupted attempts, then a completed run
    runs = con().execute("SELECT stage, status FROM runs WHERE status = 'interrupted' "
                         "ORDER BY started_at").fetchall()
    assert runs == [("download", "interrupted"), ("embed", "interrupted"),
                    ("embed", "interrupted"), ("publish", "interrupted")]
