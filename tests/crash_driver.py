"""`python tests/crash_driver.py POINT N clipgram-args…`: run the CLI, SIGKILLed at POINT.

The process kills itself (SIGKILL: no cleanup, no atexit, like the OOM killer
or a lost machine) the Nth time it reaches POINT:

  download  a file is fetched but not yet moved into the media store
  embed     an embedding batch is about to be launched (the batch before it still in flight,
            those before that written)
  parquet   an embeddings part is fully written to its temp file, not yet renamed
  catalog   the new catalog.duckdb is half built (views and documents, no FTS index)

`python tests/crash_driver.py pause POINT:N,… DIR clipgram-args…` pauses instead: at each
POINT's Nth time it creates DIR/POINT and waits for DIR/POINT.go, then goes on (the test
does something while the run is there).
"""

import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def command(cfg, recorded: Path, *driver_args: str) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of an ingest of the sample (through this driver, with
    `driver_args`), with `cfg`'s data dir and small batches (so that a stage has many points
    to stop at)."""
    from prefect.settings import PREFECT_API_URL

    from clipgram import demo

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),
           "CLIPGRAM_MODELS_CACHE_DIR": cfg.models.cache_dir, "CLIPGRAM_DECODE_WORKERS": "0",
           "CLIPGRAM_EMBED_PART_ROWS": "8", "CLIPGRAM_CAPTION_BATCH_SIZE": "8",
           "CLIPGRAM_DOWNLOAD_ALLOW_PRIVATE_NETWORK": "true"}  # the sample is served on 127.0.0.1
    run = [str(ROOT / "tests" / "crash_driver.py"), *driver_args] if driver_args else ["-m", "clipgram.cli"]
    argv = [sys.executable, *run, "ingest", demo.ACCOUNT, "--recorded", str(recorded), "--data-dir", str(cfg.data_dir), "--clip-model", "tiny",
            "--captioner", "tiny", "--device", "cpu", "--batch-size", "8"]
    return argv, env


def stop_on(owner: object, name: str, nth: int, stop, matches=lambda *a, **k: True,
            finish_first: bool = False) -> None:
    real = getattr(owner, name)
    seen = 0

    def wrapper(*args, **kwargs):
        nonlocal seen
        if matches(*args, **kwargs):
            seen += 1
            if seen == nth:
                if finish_first:
                    real(*args, **kwargs)
                stop()
        return real(*args, **kwargs)

    setattr(owner, name, wrapper)


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_on(owner: object, name: str, nth: int, **options) -> None:
    """SIGKILL the process the `nth` time `owner.name` is called (see stop_on)."""
    stop_on(owner, name, nth, _kill, **options)


def _pause(where: Path):
    def wait() -> None:
        where.touch()
        while not where.with_name(f"{where.name}.go").exists():
            time.sleep(0.05)
    return wait


def main() -> int:
    import pyarrow.parquet as pq

    from clipgram import catalog, cli
    from clipgram.models import clip
    from clipgram.stages import download

    if sys.argv[1] == "pause":
        points, folder, argv = sys.argv[2], Path(sys.argv[3]), sys.argv[4:]
        stops = [(p.split(":")[0], int(p.split(":")[1]), _pause(folder / p.split(":")[0]))
                 for p in points.split(",")]
    else:
        stops, argv = [(sys.argv[1], int(sys.argv[2]), _kill)], sys.argv[3:]
    for point, nth, stop in stops:
        if point == "download":
            stop_on(download, "_store", nth, stop)
        elif point == "embed":
            stop_on(clip.ClipEncoder, "start_encoding", nth, stop)
        elif point == "parquet":
            stop_on(pq, "write_table", nth, stop, finish_first=True,
                    matches=lambda table, where, **kw: "/embeddings/" in getattr(where, "name", ""))
        elif point == "catalog":
            stop_on(catalog, "load_extension", nth, stop)
        else:
            raise SystemExit(f"unknown point {point}")
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
