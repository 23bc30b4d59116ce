"""A torn, empty, stray or half-written file under tables/: `clipgram doctor` names each,
`clipgram repair` moves them into quarantine/ (never deletes), and a rerun redoes their rows."""

import json
import shutil

from clipgram import catalog, demo
from clipgram.cli import main


def _embeddings(data):
    with catalog.connect(data) as con:
        return con.execute("SELECT count(*), count(DISTINCT sha256) FROM embeddings").fetchone()


def test_doctor_names_unreadable_files_and_repair_moves_them_for_a_rerun(ingested_sample, prefect_harness,
                                                                        tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(ingested_sample.data_dir, data)
    before = _embeddings(data)
    part = sorted((data / "tables" / "embeddings").rglob("*.parquet"))[0]
    whole = part.read_bytes()
    part.write_bytes(whole[: len(whole) // 2])  # cut short, as by a crash or an interrupted copy
    empty = data / "tables" / "posts" / f"account={demo.ACCOUNT}" / "part-empty.parquet"
    empty.parent.mkdir(parents=True, exist_ok=True)
    empty.write_bytes(b"")
    (data / "tables" / "notes.txt").write_text("a stray file")
    (part.parent / ".part-x.parquet.1234.tmp").write_bytes(b"half")
    base = ["--data-dir", str(data), "--clip-model", "tiny", "--captioner", "tiny", "--device", "cpu"]

    for command in (["status"], ["search", "a red square"]):  # they name the file and what to do
        assert main([*command, *base]) == 2
        err = capsys.readouterr().err
        assert (part.name in err or empty.name in err) and "clipgram doctor" in err and "Traceback" not in err
    assert main(["doctor", *base, "--json"]) == 1
    listed = {r["file"]: r["problem"] for r in json.loads(capsys.readouterr().out)}
    assert len(listed) == 4 and "does not read" in listed[str(part.relative_to(data))]
    assert "empty" in listed[str(empty.relative_to(data))] and "interrupted" in " ".join(listed.values())

    assert main(["repair", *base]) == 0
    capsys.readouterr()
    for name in listed:  # moved, not deleted, with their bytes
        assert not (data / name).exists() and (data / "quarantine" / name).exists()
    assert (data / "quarantine" / part.relative_to(data)).read_bytes() == whole[: len(whole) // 2]
    assert main(["doctor", *base]) == 0

    assert main(["rerun", "--account", demo.ACCOUNT, *base]) == 0
    assert _embeddings(data) == before  # the rows the torn part held, embedded again, once
