"""`python tests/crash_driver.py POINT N clipgram-args…`: run the CLI, SIGKILLed at POINT.

The process kills itself (SIGKILL: no cleanup, no atexit, like the OOM killer
or a lost machine) the Nth time it reaches POINT:

  download  a file is fetched but not yet moved into the media store
  embed     an embedding batch is about to be launched (the batch before it still in flight,
            those before that written)
  parquet   an embeddings part is fully written to its temp file, not yet renamed
  catalog   the new catalog.duckdb is half built (views and documents, no FTS index)
"""

import os
import signal
import sys


def kill_on(owner: object, name: str, nth: int, matches=lambda *a, **k: True,
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
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(owner, name, wrapper)


def main() -> int:
    point, nth, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    import pyarrow.parquet as pq

    from clipgram import catalog, cli
    from clipgram.models import clip
    from clipgram.stages import download

    if point == "download":
        kill_on(download, "_store", nth)
    elif point == "embed":
        kill_on(clip.ClipEncoder, "start_encoding", nth)
    elif point == "parquet":
        kill_on(pq, "write_table", nth, finish_first=True,
                matches=lambda table, where, **kw: "/embeddings/" in getattr(where, "name", ""))
    elif point == "catalog":
        kill_on(catalog, "load_extension", nth)
    else:
        raise SystemExit(f"unknown point {point}")
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
