"""Publish is atomic for readers: a search running in another process while publish rewrites
the catalog and its vector index, again and again, sees the old catalog or the new one,
never an error."""

import json
import shutil
import subprocess
import sys

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
