"""Two ingests of one account at once (a schedule and a manual run, two terminals): whatever
moment the second starts at, it exits in one line naming the run that holds the account and
changes nothing, and the tables end with the rows of one run. Real `clipgram ingest`
processes (tests/crash_driver.py holds the first at the moment chosen)."""

import subprocess
import time

import crash_driver
from snapshots import assert_same, snapshot

from clipgram import demo
from clipgram.flows.ingest import ingest_account

SETTINGS = {"embed": {"batch_size": 8, "part_rows": 8}, "caption": {"batch_size": 8, "part_rows": 8},
            "decode": {"workers": 0}}
# early (downloading), in a model stage (between embedding batches), in publish (the catalog half built)
MOMENTS = ("download:3", "embed:2", "catalog:1")


def _start(cfg, recorded, *driver_args: str) -> subprocess.Popen:
    argv, env = crash_driver.command(cfg, recorded, *driver_args)
    return subprocess.Popen(argv, cwd=crash_driver.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _refused(proc: subprocess.Popen, holder: int | None = None, said: str | None = None) -> None:
    """It exited 2 with one line naming the run that holds the account (its pid, when known)."""
    err = said if said is not None else proc.communicate(timeout=300)[1]
    said = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(said) == 1, err
    assert said[0].startswith(f"error: account {demo.ACCOUNT} is already being ingested (pid "), said
    assert holder is None or f"(pid {holder} on " in said[0]
    assert "this run changes nothing" in said[0]


def _wait_for(path, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"the run did not reach {path.name} in {timeout_s:.0f} s"
        try:
            proc.wait(0.05)
        except subprocess.TimeoutExpired:
            pass


def test_a_second_ingest_at_any_moment_of_the_first_exits_in_one_line_and_changes_nothing(
        prefect_harness, make_config, recorded, tmp_path):
    reference = make_config(tmp_path / "reference", **SETTINGS)
    ingest_account(demo.ACCOUNT, reference.as_dict(), str(recorded))
    expected = snapshot(reference.data_dir)

    # both started at once: one of them runs, the other (if it came while the first ran) exits
    together = make_config(tmp_path / "together", **SETTINGS)
    both = [_start(together, recorded), _start(together, recorded)]
    said = {p.pid: p.communicate(timeout=300)[1] for p in both}
    codes = sorted(p.returncode for p in both)
    assert codes[0] == 0 and codes[1] in (0, 2), said
    for proc in both:
        if proc.returncode == 2:
            _refused(proc, said=said[proc.pid])
    assert_same(snapshot(together.data_dir), expected)

    # the second started while the first is at each moment of its run
    cfg = make_config(tmp_path / "data", **SETTINGS)
    held = tmp_path / "held"
    held.mkdir()
    first = _start(cfg, recorded, "pause", ",".join(MOMENTS), str(held))
    try:
        for moment in MOMENTS:
            point = held / moment.split(":")[0]
            _wait_for(point, first)
            before = sorted(p.relative_to(cfg.data_dir) for p in (cfg.data_dir / "tables").rglob("*"))
            _refused(_start(cfg, recorded), holder=first.pid)
            assert sorted(p.relative_to(cfg.data_dir) for p in (cfg.data_dir / "tables").rglob("*")) == before
            point.with_name(f"{point.name}.go").touch()
        out, err = first.communicate(timeout=300)
    finally:  # a failed check leaves no paused run behind, waiting for ever
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-3000:]
    assert_same(snapshot(cfg.data_dir), expected)
