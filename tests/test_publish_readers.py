"""Publish is atomic for readers: a search running in another process while publish rewrites
the catalog and its vector index, again and again, sees the old catalog or the new one,
never an error."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from clipgram import catalog
from clipgram.stages import publish

READER = """
import json, sys
from pathlib import Path
from clipgram.cli import main
data, media_id, stop = sys.argv[1], sys.argv[2], Path(sys.argv[3])
runs = failures = 0
while not stop.exists():
    runs += 1
    failures += main(["search", "--like", media_id, "-k", "3", "--data-dir", data, "--json"]) != 0
print(json.dumps({"runs": runs, "failures": failures}), file=sys.stderr)
"""


def test_a_search_during_publishes_never_fails(ingested_sample, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(ingested_sample.data_dir, data)
    with catalog.connect(data) as con:
        media_id = con.execute("SELECT media_id FROM search_rows LIMIT 1").fetchone()[0]
        models = catalog.meta(con)
    stop = tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(data), media_id, str(stop)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for i in range(12):  # each publish writes the catalog and a vector index of another name
            publish.publish(data, models["clip_model"], int(models["clip_dim"]), models["captioner"],
                            force=True, quiet=True, ann_threshold=None if i % 2 else 10**9)
    finally:
        stop.touch()
        _, err = reader.communicate(timeout=120)
    counts = json.loads(err.strip().splitlines()[-1])
    assert counts["runs"] >= 3 and counts["failures"] == 0, err


KILLED_PUBLISH = """
import os, sys
from pathlib import Path
from tests.crash_driver import kill_on
from clipgram import ann, catalog
from clipgram.stages import publish
data, point, clip, dim, captioner = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
if point == "matrix":     # the new vector matrix written, the catalog half-built
    kill_on(publish, "write_matrix", 1, finish_first=True)
elif point == "ann":      # the approximate index written to its temp file, not renamed
    kill_on(os, "replace", 1, matches=lambda src, dst: str(dst).endswith(ann.SUFFIX))
elif point == "fts":      # documents materialised, no full-text index yet
    kill_on(catalog, "load_extension", 1)
elif point == "swap":     # the new catalog complete, about to be renamed into place
    kill_on(os, "replace", 1, matches=lambda src, dst: str(dst).endswith(catalog.CATALOG))
elif point == "swapped":  # renamed into place, the old index files and the models file not yet done
    kill_on(publish, "_drop_stale_indexes", 1)
publish.publish(data, clip, dim, captioner, force=True, quiet=True, ann_threshold=1)
"""

PUBLISHER = """
import sys
from pathlib import Path
from clipgram.stages import publish
data, clip, dim, captioner = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
for i in range(4):
    publish.publish(data, clip, dim, captioner, force=True, quiet=True, ann_threshold=None if i % 2 else 1)
"""


def _search(data, media_id) -> list[str]:
    import contextlib
    import io

    from clipgram.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["search", "--like", media_id, "-k", "5", "--data-dir", str(data), "--json"]) == 0
    text = printed.getvalue()
    return [row["media_id"] for row in json.loads(text[text.index("["):])]


def test_publish_killed_at_any_point_or_run_twice_at_once_leaves_a_catalog_that_reads(ingested_sample, tmp_path):
    """SIGKILL at five moments of publish, then two publishers at once, while a search loops in
    another process: it never fails, the catalog left after each kill reads and finds what it
    found before, and the next publish clears what the killed one left."""
    root = Path(__file__).resolve().parents[1]
    data = tmp_path / "data"
    shutil.copytree(ingested_sample.data_dir, data)
    with catalog.connect(data) as con:
        media_id = con.execute("SELECT media_id FROM search_rows LIMIT 1").fetchone()[0]
        models = catalog.meta(con)
    args = [models["clip_model"], models["clip_dim"], models["captioner"]]
    found = _search(data, media_id)
    stop = tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(data), media_id, str(stop)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for point in ("matrix", "ann", "fts", "swap", "swapped"):
            killed = subprocess.run([sys.executable, "-c", KILLED_PUBLISH, str(data), point, *args],
                                    cwd=root, capture_output=True, text=True, timeout=300)
            assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-2000:])
            assert _search(data, media_id) == found, point
        publishers = [subprocess.Popen([sys.executable, "-c", PUBLISHER, str(data), *args], cwd=root,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                      for _ in range(2)]
        for publisher in publishers:
            _, err = publisher.communicate(timeout=600)
            assert publisher.returncode == 0, err[-2000:]
    finally:
        stop.touch()
        _, err = reader.communicate(timeout=120)
    counts = json.loads(err.strip().splitlines()[-1])
    assert counts["runs"] >= 3 and counts["failures"] == 0, err
    assert _search(data, media_id) == found
    assert not list(data.glob(".catalog.duckdb.tmp*")) and not list((data / publish.INDEX_DIR).glob(".*"))
    with catalog.connect(data) as con:
        named = {v for k, v in catalog.meta(con).items() if k in ("vector_index", "ann_index") and v}
    assert len(list((data / publish.INDEX_DIR).iterdir())) <= 2 * len(named) + 2  # this generation's and the last
