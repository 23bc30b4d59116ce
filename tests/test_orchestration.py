"""Running unattended: the runs ledger, status, reruns of failed stages, retries, the account lock.

Real Prefect runs (the session's test API), real Parquet and DuckDB, real
HTTP downloads from a local server whose files the tests take away and put back.
"""

import json
import shutil
import threading
import time

import pytest
from prefect import flow, task

from clipgram import catalog, dag, demo, ledger, rerun, status, tables
from clipgram.cli import main
from clipgram.flows.ingest import ingest_account, network_options
from clipgram.lock import AccountBusy, account_lock
from clipgram.result import StageResult

A = demo.ACCOUNT
MISSING = "CgDemo0003.jpg"  # a single-image post of the sample


@pytest.fixture
def site(tmp_path):
    """The sample profile served from a copy the test can change, minus one image."""
    root = tmp_path / "site"
    shutil.copytree(demo.SAMPLE_DIR, root)
    held = tmp_path / MISSING
    shutil.move(root / "images" / MISSING, held)
    with demo.serve(root) as base_url:
        yield root, held, demo.materialize(tmp_path / "recorded", base_url)


def _cli_base(cfg):
    return ["--data-dir", str(cfg.data_dir), "--clip-model", "tiny", "--captioner", "tiny",
            "--device", "cpu"]


def _fetch_args(cfg):
    return [*_cli_base(cfg), "--allow-private-network"]  # the sample is served on 127.0.0.1


def _status(cfg):
    return {r["stage"]: r for r in status.rows(cfg.data_dir, *_published_ids(cfg))}


def _published_ids(cfg):
    if not (cfg.data_dir / catalog.CATALOG).exists():
        return None, None
    meta = catalog.meta(catalog.connect(cfg.data_dir))
    return meta["clip_model"], meta["captioner"]


def _runs(cfg):
    return tables.connect(cfg.data_dir).execute(
        "SELECT run_id, stage, status, done, failed, error FROM runs ORDER BY started_at").fetchall()


def test_failed_stage_shows_in_status_and_reruns_then_failed_media_retry(
        prefect_harness, make_config, site, tmp_path, capsys):
    root, held, recorded = site
    bad = make_config(tmp_path / "data", models={"clip": f"tiny:{tmp_path}/no-such-checkpoint.pt"})
    with pytest.raises(Exception, match="no-such-checkpoint"):
        ingest_account(A, bad.as_dict(), str(recorded))

    # the ledger: scrape and download completed, embed failed once (no retry on a bad model)
    runs = _runs(bad)
    assert [(s, st) for _, s, st, *_ in runs if st != "running"] == [
        ("scrape", "completed"), ("download", "completed"), ("embed", "failed")]
    assert len({r[0] for r in runs}) == 1  # one flow run
    download = next(r for r in runs if r[1] == "download" and r[2] == "completed")
    assert download[4] == 1  # the missing image

    status = _status(bad)
    assert status["embed"]["last_run"] == "failed" and "no-such-checkpoint" in status["embed"]["last_error"]
    assert status["download"]["failed"] == 1 and "404" in status["download"]["last_error"]
    assert "caption" not in {s for s, r in status.items() if r["last_run"]}

    # `rerun` starts at the failed stage and finishes the DAG with a good model
    good = make_config(tmp_path / "data")
    assert rerun.plan(list(status.values()), A, None, False, False) == ["embed", "caption", "ocr", "publish", "analyse"]
    assert main(["rerun", "--account", A, *_fetch_args(good)]) == 0
    status = _status(good)
    images = status["download"]["done"]
    assert status["embed"]["done"] == status["caption"]["done"] == images > 0
    assert status["embed"]["last_run"] == status["publish"]["last_run"] == "completed"
    assert status["download"]["failed"] == 1  # not retried unless asked
    capsys.readouterr()
    assert main(["rerun", "--account", A, *_fetch_args(good)]) == 0
    assert "nothing to rerun" in capsys.readouterr().out

    # --retry-failed: the image is back; only the failed row is downloaded again
    done_before = dict(tables.connect(good.data_dir).execute(
        "SELECT media_id, updated_at FROM media WHERE status = 'done'").fetchall())
    shutil.move(held, root / "images" / MISSING)
    assert main(["rerun", "--account", A, "--retry-failed", *_fetch_args(good)]) == 0
    status = _status(good)
    assert status["download"]["failed"] == 0 and status["download"]["done"] == images + 1
    assert status["embed"]["done"] == status["caption"]["done"] == images + 1
    con = tables.connect(good.data_dir)
    assert dict(con.execute("SELECT media_id, updated_at FROM media WHERE media_id IN "
                            f"({', '.join('?' * len(done_before))})", list(done_before)).fetchall()) == done_before
    emb = tables.scan_sql(tables.EMBEDDINGS, good.data_dir, str(good.data_dir))
    assert con.execute(f"SELECT count(*) = count(DISTINCT sha256) FROM ({emb})").fetchone() == (True,)

    # history in SQL through the catalog, and in the CLI's status
    cat = catalog.connect(good.data_dir)
    by_status = dict(cat.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall())
    assert by_status["failed"] == 1 and "running" not in by_status
    assert cat.execute("SELECT count(DISTINCT run_id) FROM runs").fetchone() == (3,)
    capsys.readouterr()
    assert main(["status", "--json", *_cli_base(good)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["stage"] for r in rows} == set(dag.NAMES)
    assert all(r["pending"] == r["failed"] == 0 for r in rows)


def test_second_ingest_of_a_busy_account_exits_with_a_clear_message(
        prefect_harness, make_config, recorded, tmp_path):
    cfg = make_config(tmp_path / "data")
    with account_lock(cfg.data_dir, A):
        with pytest.raises(AccountBusy, match=f"{A} is already being ingested .*pid"):
            ingest_account(A, cfg.as_dict(), str(recorded), stages_to_run=["scrape"])
        assert not (cfg.data_dir / "tables").exists()  # it changed nothing
        assert main(["ingest", A, "--recorded", str(recorded), *_fetch_args(cfg)]) == 2


def test_second_ingest_waits_for_the_lock_when_asked(prefect_harness, make_config, recorded, tmp_path):
    cfg = make_config(tmp_path / "data", orchestration={"lock_wait_s": 30.0})
    release = threading.Event()

    def hold():
        with account_lock(cfg.data_dir, A):
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.2)
    threading.Timer(1.0, release.set).start()
    started = time.monotonic()
    results = ingest_account(A, cfg.as_dict(), str(recorded), stages_to_run=["scrape"])
    holder.join()
    assert time.monotonic() - started >= 0.9
    assert results[0].stage == "scrape" and results[0].done > 0


class Flaky(ConnectionError):
    pass


def test_network_tasks_retry_transient_errors_with_backoff_but_not_deterministic_ones(
        prefect_harness, make_config, tmp_path):
    cfg = make_config(tmp_path, orchestration={"network_retries": 3, "retry_delay_s": 0.2,
                                               "retry_jitter": 0.5})
    options = network_options(cfg)
    assert options["retry_delay_seconds"] == pytest.approx([0.2, 0.4, 0.8])
    calls: dict[str, list[float]] = {"flaky": [], "bad": []}

    @task(**options)
    def attempt(kind: str) -> str:
        calls[kind].append(time.monotonic())
        if kind == "flaky" and len(calls[kind]) < 3:
            raise Flaky("connection reset by peer")
        if kind == "bad":
            raise ValueError("not an image")
        return "ok"

    @flow
    def both() -> tuple:
        return attempt("flaky"), attempt("bad", return_state=True)

    ok, bad = both()
    assert ok == "ok" and len(calls["flaky"]) == 3
    gaps = [b - a for a, b in zip(calls["flaky"], calls["flaky"][1:])]
    assert gaps[0] >= 0.2 * 0.5 and gaps[1] >= 0.4 * 0.5  # backed off, jittered at most ±50 %
    assert bad.is_failed() and len(calls["bad"]) == 1


def test_ledger_records_attempts_marks_dead_ones_and_compacts(tmp_path):
    data = tmp_path / "data"

    def work() -> StageResult:
        return StageResult("embed", A, done=2, failed=1)

    for i in range(6):
        ledger.record(data, f"run{i}", A, "embed", work)
    with pytest.raises(OSError, match="disk full"):
        ledger.record(data, "run6", A, "embed", lambda: (_ for _ in ()).throw(OSError("disk full")))
    # a process that died mid-stage leaves its `running` row behind
    tables.write_part(data, tables.RUNS, A, [{
        "attempt_id": "dead", "run_id": "run7", "stage": "caption", "status": "running",
        "started_at": tables.now(), "host": "elsewhere", "pid": 1}])
    con = tables.connect(data)
    history = con.execute("SELECT * EXCLUDE (updated_at) FROM runs ORDER BY attempt_id").fetchall()
    assert len(history) == 8 and len(list(tables.RUNS.dir(data).rglob("*.parquet"))) == 15

    ledger.open_account(data, A, max_parts=4)
    assert len(list(tables.RUNS.dir(data).rglob("*.parquet"))) == 1
    after = tables.connect(data).execute(
        "SELECT * EXCLUDE (updated_at) FROM runs ORDER BY attempt_id").fetchall()
    columns = [f.name for f in tables.RUNS.schema if f.name != "updated_at"] + ["account"]
    assert len(after) == 8
    changed = [dict(zip(columns, b)) for a, b in zip(history, after) if a != b]
    assert [(r["attempt_id"], r["status"]) for r in changed] == [("dead", "interrupted")]
    assert tables.connect(data).execute(
        "SELECT status, error FROM runs WHERE run_id = 'run6'").fetchone() == ("failed", "OSError: disk full")


def test_unchanged_inputs_skip_a_stage_until_they_change(tmp_path):
    data = tmp_path / "data"
    calls = []

    def work() -> StageResult:
        calls.append(1)
        return StageResult("download", A, done=1)

    def inputs() -> str:
        return tables.fingerprint(data, [f"media/{tables.MEDIA.parts(A)}"])

    first = ledger.record(data, "r1", A, "download", work, inputs)
    second = ledger.record(data, "r2", A, "download", work, inputs)
    assert first.done == 1 and second.note.startswith("skipped") and len(calls) == 1
    tables.write_part(data, tables.MEDIA, A, [{"media_id": "x_0", "status": "pending"}])
    ledger.record(data, "r3", A, "download", work, inputs)
    assert len(calls) == 2


def test_rerun_plan():
    rows = [{"account": A, "stage": s, "pending": 0, "failed": 0, "last_run": "completed"}
            for s in dag.NAMES]
    assert rerun.plan(rows, A, None, False, False) == []
    assert rerun.plan(rows, A, "embed", False, False) == ["embed", "caption", "ocr", "publish", "analyse"]
    assert rerun.plan(rows, A, "embed", True, False) == ["embed"]
    rows[1]["failed"] = 2
    assert rerun.plan(rows, A, None, False, False) == []
    assert rerun.plan(rows, A, None, False, True)[0] == "download"
    rows[3]["last_run"] = "interrupted"
    assert rerun.plan(rows, A, None, False, False)[0] == "caption"
    with pytest.raises(ValueError, match="one of scrape"):
        dag.ordered(["embedd"])


def test_rerun_of_an_unknown_account_says_to_ingest_it_first(make_config, tmp_path, capsys):
    cfg = make_config(tmp_path / "data")
    assert main(["rerun", "--account", "nobody", *_fetch_args(cfg)]) == 2
    assert "clipgram ingest nobody" in capsys.readouterr().err


def test_retry_failed_captions_again_the_images_whose_captioning_failed(
        prefect_harness, make_config, sample_paths, tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    for path in sample_paths[:3]:
        shutil.copy(path, folder / path.name)
    cfg = make_config(tmp_path / "data")
    ingest_account(A, cfg.as_dict(), source=str(folder), stages_to_run=["scrape", "download"])
    con = tables.connect(cfg.data_dir)
    stored = cfg.data_dir / con.execute("SELECT min(path) FROM media WHERE status = 'done'").fetchone()[0]
    good = stored.read_bytes()
    stored.write_bytes(good[:len(good) // 3])  # torn on disk after it was verified
    ingest_account(A, cfg.as_dict(), stages_to_run=["embed", "caption", "publish"])
    status = _status(cfg)
    assert status["caption"]["failed"] == 1 and status["caption"]["done"] == 2
    assert (status["embed"]["failed"], status["embed"]["pending"]) == (1, 0)  # a row saying why

    stored.write_bytes(good)  # e.g. the disk restored from a backup
    capsys.readouterr()
    assert main(["rerun", "--account", A, "--retry-failed", *_cli_base(cfg)]) == 0
    status = _status(cfg)
    assert status["caption"]["failed"] == 0 and status["caption"]["done"] == 3
    assert status["embed"]["done"] == 3
    cat = catalog.connect(cfg.data_dir)
    assert cat.execute("SELECT count(*), count(DISTINCT sha256), count(generated_caption) "
                       "FROM images").fetchone() == (3, 3, 3)
