import os

import pytest

from clipgram import tables


def test_latest_row_per_key_wins(tmp_path):
    row = {"media_id": "A_0", "shortcode": "A", "position": 0, "url": "http://x/a.jpg", "status": "pending"}
    tables.write_part(tmp_path, tables.MEDIA, "acct", [row])
    tables.write_part(tmp_path, tables.MEDIA, "acct", [{**row, "status": "done", "sha256": "ab" * 32}])
    con = tables.connect(tmp_path)
    assert con.execute("SELECT status, sha256, account FROM media").fetchall() == [("done", "ab" * 32, "acct")]


def test_empty_tables_are_typed_views(tmp_path):
    con = tables.connect(tmp_path)
    for table in tables.ALL_TABLES:
        rel = con.sql(f"SELECT * FROM {table.name}")
        assert rel.fetchall() == []
        assert set(rel.columns) == {f.name for f in table.schema} | {table.partition}


def test_numeric_account_names_stay_text(tmp_path):
    tables.write_part(tmp_path, tables.POSTS, "1234", [{"shortcode": "S"}])
    assert tables.connect(tmp_path).execute("SELECT account FROM posts").fetchone() == ("1234",)


def test_no_rows_writes_nothing(tmp_path):
    assert tables.write_part(tmp_path, tables.POSTS, "acct", []) is None
    assert not (tmp_path / "tables").exists()


def test_a_write_killed_midway_leaves_nothing_visible(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process died before the rename

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        tables.write_part(tmp_path, tables.POSTS, "acct", [{"shortcode": "S"}])
    monkeypatch.undo()
    assert list((tmp_path / "tables").rglob("*")) == [tmp_path / "tables" / "posts",
                                                       tmp_path / "tables" / "posts" / "account=acct"]
    assert tables.connect(tmp_path).execute("SELECT count(*) FROM posts").fetchone() == (0,)


@pytest.mark.parametrize("value", ["a/b", "..", "x y", "a=b", ""])
def test_partition_values_are_checked(value):
    with pytest.raises(ValueError):
        tables.check_partition_value(value)


def test_a_run_starts_by_removing_temp_files_killed_runs_left(tmp_path):
    from clipgram import ledger

    part = tables.write_part(tmp_path, tables.EMBEDDINGS, "m", [{"sha256": "a" * 64, "embedding": [1.0]}])
    old = part.parent / f".{part.name}.dead.tmp"     # a killed run's, hours ago
    fresh = part.parent / f".{part.name}.live.tmp"   # a writer that is busy right now
    for tmp in (old, fresh):
        tmp.write_bytes(b"PAR1")
    os.utime(old, (0, 0))
    ledger.open_account(tmp_path, "acct")
    assert not old.exists()
    assert fresh.exists() and part.exists()
