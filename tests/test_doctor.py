"""A torn, empty, stray or half-written file under tables/: `clipgram doctor` names each,
`clipgram repair` moves them into quarantine/ (never deletes), and a rerun redoes their rows."""

import json
import shutil

import httpx
import pyarrow.parquet as pq
import pytest

from clipgram import catalog, demo
from clipgram.app import library, server
from clipgram.cli import main


def _embeddings(data):
    with catalog.connect(data) as con:
        return con.execute("SELECT count(*), count(DISTINCT sha256) FROM embeddings").fetchone()


def _last_attempt(data, stage):
    with catalog.connect(data) as con:
        return con.execute("SELECT status, done FROM runs WHERE stage = ? ORDER BY started_at DESC LIMIT 1",
                           [stage]).fetchone()


def test_doctor_names_unreadable_files_and_repair_moves_them_for_a_rerun(ingested_sample, prefect_harness,
                                                                        recorded, tmp_path, capfd):
    data = tmp_path / "data"
    shutil.copytree(ingested_sample.data_dir, data)
    before = _embeddings(data)
    part = sorted((data / "tables" / "embeddings").rglob("*.parquet"))[0]
    held = pq.read_metadata(part).num_rows
    whole = part.read_bytes()
    part.write_bytes(whole[: len(whole) // 2])  # cut short, as by a crash or an interrupted copy
    empty = data / "tables" / "posts" / f"account={demo.ACCOUNT}" / "part-empty.parquet"
    empty.parent.mkdir(parents=True, exist_ok=True)
    empty.write_bytes(b"")
    (data / "tables" / "notes.txt").write_text("a stray file")
    (part.parent / ".part-x.parquet.1234.tmp").write_bytes(b"half")
    base = ["--data-dir", str(data), "--clip-model", "tiny", "--captioner", "tiny", "--device", "cpu"]
    ingest = ["ingest", demo.ACCOUNT, "--recorded", str(recorded), *base]

    # a command, and a flow run with its stages, name the file and what to do in one line
    for command in (["status", *base], ["search", "a red square", *base], ingest):
        capfd.readouterr()
        assert main(command) == 2
        err = capfd.readouterr().err
        said = [line for line in err.splitlines() if line.strip()]
        assert len(said) == 1 and said[0].startswith("error: "), err
        assert (str(part) in err or str(empty) in err) and "clipgram doctor" in err
    assert main(["doctor", *base, "--json"]) == 1
    listed = {r["file"]: r["problem"] for r in json.loads(capfd.readouterr().out)}
    assert len(listed) == 4 and "does not read" in listed[str(part.relative_to(data))]
    assert "empty" in listed[str(empty.relative_to(data))] and "interrupted" in " ".join(listed.values())

    assert main(["repair", *base]) == 0
    capfd.readouterr()
    for name in listed:  # moved, not deleted, with their bytes
        assert not (data / name).exists() and (data / "quarantine" / name).exists()
    assert (data / "quarantine" / part.relative_to(data)).read_bytes() == whole[: len(whole) // 2]
    assert main(["doctor", *base]) == 0

    # the next plain run (a scheduled one) is not skipped as unchanged: the embed stage's
    # fingerprint names its parts, one of which went; it embeds exactly the rows that part held
    assert main(ingest) == 0
    assert _last_attempt(data, "embed") == ("completed", held)
    assert _embeddings(data) == before  # the rows the torn part held, embedded again, once


@pytest.mark.parametrize("table", ["posts", "clusters"])
def test_the_app_names_a_file_that_does_not_read_and_works_again_after_repair(app_library, ingested_sample,
                                                                             tmp_path, table):
    """A torn source part: every page of the app says which file and what to do; a torn derived
    part: only the pages that read it (clusters, and the map coloured by them) do. After `repair`, every page answers."""
    data = tmp_path / "data"
    shutil.copytree(app_library, data)
    part = sorted((data / "tables" / table).rglob("*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:100])
    lib = library.Library(data, ingested_sample.models)
    paths = ["/api/search?q=a+red+circle", "/api/search?q=yellow&mode=captions", "/api/status",
             "/api/clusters", "/api/clusters/0", "/api/map", "/api/duplicates",
             "/api/map/region?x0=0&y0=0&x1=1&y1=1"]
    with server.running(lib) as url, httpx.Client(base_url=url, timeout=60) as http:
        answers = {path: http.get(path) for path in paths}
        failing = {path for path, r in answers.items() if r.status_code != 200}
        for path in failing:
            assert answers[path].status_code == 503, answers[path].text
            error = answers[path].json()["error"]
            assert str(part) in error and "clipgram repair" in error
        assert failing == (set(paths) if table == "posts" else {"/api/clusters", "/api/clusters/0", "/api/map"})

        assert main(["repair", "--data-dir", str(data)]) == 0
        assert all(http.get(path).status_code == 200 for path in paths)
