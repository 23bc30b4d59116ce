"""What an ingest run determines, read back from a data directory, for comparing two runs."""

from pathlib import Path

import numpy as np

from clipgram import catalog as catalogs
from clipgram import tables


def snapshot(data_dir: Path, catalog: bool = True) -> dict:
    """Everything an uninterrupted run determines, without write times; `catalog`: with the
    published catalog's documents (a machine that did not publish has none)."""
    con = tables.connect(data_dir)
    raw = {t.name: tables.scan_sql(t, data_dir, str(data_dir)) for t in (tables.EMBEDDINGS, tables.CAPTIONS)}
    found = {
        "posts": con.execute("SELECT * EXCLUDE (updated_at) FROM posts ORDER BY shortcode").fetchall(),
        "media": con.execute("SELECT * EXCLUDE (updated_at) FROM media ORDER BY media_id").fetchall(),
        # raw parts, not the latest-row views: a duplicate row here is a duplicate
        "embeddings": con.execute(f"SELECT model, sha256, embedding FROM ({raw['embeddings']}) "
                                  "ORDER BY sha256").fetchall(),
        "captions": con.execute(f"SELECT model, sha256, caption, error FROM ({raw['captions']}) "
                                "ORDER BY sha256").fetchall(),
    }
    if catalog:
        found["documents"] = catalogs.connect(data_dir).execute("SELECT * FROM documents ORDER BY media_id").fetchall()
    return found


def assert_same(actual: dict, expected: dict) -> None:
    """Two snapshots hold the same rows: every table equal, the embeddings' vectors to 1e-5
    (another process, or a batch of another size, may round them differently)."""
    for table in actual.keys() - {"embeddings"}:
        assert actual[table] == expected[table], table
    assert [r[:2] for r in actual["embeddings"]] == [r[:2] for r in expected["embeddings"]]
    np.testing.assert_allclose(np.array([r[2] for r in actual["embeddings"]]),
                               np.array([r[2] for r in expected["embeddings"]]), atol=1e-5)
