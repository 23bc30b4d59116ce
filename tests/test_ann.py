"""The approximate index (clipgram/ann.py): against the exact scan, filtered and not, and how
publish builds, keeps and drops it."""

import numpy as np
import pytest

from clipgram import ann, catalog, search
from clipgram.stages import publish


def clustered(count: int, seed: int) -> np.ndarray:
    """Unit vectors spread as CLIP's roughly are (bench.search.clustered_unit_vectors: 512-d)."""
    from bench.search import DIM, clustered_unit_vectors

    return np.concatenate(list(clustered_unit_vectors(count, DIM, seed)))


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    matrix = clustered(60_000, 1)
    path = ann.build(matrix, tmp_path_factory.mktemp("ann") / f"vectors{ann.SUFFIX}")
    return search.VectorIndex(matrix), search.VectorIndex(matrix, ann.load(path, len(matrix))), path


def _recall(found, exact):
    return np.mean([len(np.intersect1d(f, e)) / len(e) for f, e in zip(found, exact)])


def test_the_approximate_top_k_is_the_exact_one_with_exact_scores(indexes):
    exact, approximate, _ = indexes
    assert approximate.approximate is not None
    queries = clustered(40, 2)
    found = [approximate.top(q, 10) for q in queries]
    truth = [exact.top(q, 10)[0] for q in queries]
    assert _recall([rows for rows, _ in found], truth) >= 0.95
    for (rows, scores), q in zip(found, queries):  # re-ranked with the full-precision vectors
        np.testing.assert_allclose(scores, exact.matrix[rows] @ q, rtol=1e-6)
        assert list(scores) == sorted(scores, reverse=True)


@pytest.mark.parametrize("share", [0.5, 0.01])
def test_a_filtered_search_returns_the_top_k_of_the_filtered_rows(indexes, share):
    """Half the rows: the index searches among them only; 1 %: fewer than EXACT_BELOW, scanned."""
    exact, approximate, _ = indexes
    rng = np.random.default_rng(3)
    allowed = np.sort(rng.choice(len(exact.matrix), int(share * len(exact.matrix)), replace=False))
    queries = clustered(20, 4)
    found = [approximate.top(q, 10, allowed)[0] for q in queries]
    truth = [exact.top(q, 10, allowed)[0] for q in queries]
    assert all(np.isin(f, allowed).all() and len(f) == 10 for f in found)
    assert _recall(found, truth) >= (0.95 if len(allowed) >= ann.EXACT_BELOW else 1.0)


def test_a_torn_index_is_not_used(indexes, tmp_path):
    _, _, path = indexes
    torn = tmp_path / f"torn{ann.SUFFIX}"
    torn.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    assert ann.load(torn, 60_000) is None
    assert ann.load(path, 59_999) is None  # built over another matrix
    assert ann.load(tmp_path / "missing.faiss", 60_000) is None


def test_publish_builds_keeps_and_drops_the_index(tmp_path):
    from bench.app import build_library, library_settings

    data = tmp_path / "data"
    _, model_id, dim = library_settings(data)
    build_library(data, 2_000, model_id, dim)
    publish.publish(data, model_id, dim, None, ann_threshold=1_000)
    with catalog.connect(data) as con:
        built = catalog.meta(con)["ann_index"]
        index = search.VectorIndex.open(con, data)
        assert index.approximate is not None and search.VectorIndex.open(con, data, exact=True).approximate is None
    stamp = (data / built).stat().st_mtime_ns
    publish.republish(data, force=True)  # nothing about the vectors changed: the index is kept
    with catalog.connect(data) as con:
        assert catalog.meta(con)["ann_index"] == built and (data / built).stat().st_mtime_ns == stamp
    publish.publish(data, model_id, dim, None, ann_threshold=5_000)  # now below the threshold
    with catalog.connect(data) as con:
        assert catalog.meta(con)["ann_index"] is None and search.VectorIndex.open(con, data).approximate is None
    assert (data / built).exists()  # kept one more publish, for a reader of the replaced catalog
    publish.republish(data, force=True)
    assert not (data / built).exists()


def test_sql_ranks_with_the_index_a_search_uses(tmp_path, capsys):
    import json

    from bench.app import build_library, library_settings
    from clipgram.cli import main

    data = tmp_path / "data"
    _, model_id, dim = library_settings(data)
    build_library(data, 2_000, model_id, dim)
    publish.publish(data, model_id, dim, None, ann_threshold=1_000)
    nearest = ("SELECT row, score FROM (SELECT unnest(clip_nearest((SELECT embedding FROM embeddings "
               "JOIN search_rows USING (sha256) WHERE row = 7), 3), recursive := true))")
    assert main(["sql", nearest, "--data-dir", str(data), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["row"] == 7 and rows[0]["score"] == pytest.approx(1.0, abs=1e-5) and len(rows) == 3
    assert catalog._UDF_INDEX[model_id].approximate is not None  # the approximate index answered


def test_publish_extends_the_index_when_images_are_only_added(tmp_path, caplog):
    """New images get new rows after the old ones, whatever their media ids: the index gains
    their vectors in its lists; a library that doubles gets one trained anew."""
    from bench.app import build_library, library_settings

    data = tmp_path / "data"
    _, model_id, dim = library_settings(data)
    build_library(data, 2_000, model_id, dim, first=1_000)
    publish.publish(data, model_id, dim, None, ann_threshold=1_000)
    with catalog.connect(data) as con:
        first = catalog.meta(con)["ann_index"]
        rows = dict(con.execute("SELECT media_id, row FROM search_rows").fetchall())
    build_library(data, 500, model_id, dim, first=0)  # media ids that sort before the others
    with caplog.at_level("INFO", logger="clipgram"):
        publish.publish(data, model_id, dim, None, ann_threshold=1_000)
    assert "approximate index extended by 500 images" in caplog.text
    with catalog.connect(data) as con:
        extended = catalog.meta(con)["ann_index"]
        assert extended != first and (data / first).exists()  # the replaced catalog's, one more publish
        assert dict(con.execute("SELECT media_id, row FROM search_rows WHERE row < 2000").fetchall()) == rows
        exact, approximate = search.VectorIndex.open(con, data, exact=True), search.VectorIndex.open(con, data)
        assert approximate.approximate.index.ntotal == 2_500
        for row in range(2_000, 2_500, 25):  # an added image is found by its own vector
            assert approximate.top(np.asarray(exact.matrix[row]), 1)[0][0] == row
    caplog.clear()
    build_library(data, 2_000, model_id, dim, first=3_000)
    with caplog.at_level("INFO", logger="clipgram"):
        publish.publish(data, model_id, dim, None, ann_threshold=1_000)
    assert "approximate index of 4500 images built" in caplog.text


def test_rows_of_a_memory_mapped_matrix_are_gathered_in_their_order(tmp_path):
    """Re-ranking asks for the candidates' pages first (madvise): the rows are the right ones,
    also from a slice of the map and from its last row."""
    matrix = clustered(1_000, 5)
    np.save(tmp_path / "m.npy", matrix)
    index = search.VectorIndex(np.load(tmp_path / "m.npy", mmap_mode="r")[:900])
    assert index._mapped is not None
    rows = [899, 5, 0, 431, 5]
    np.testing.assert_array_equal(index.vectors(rows), matrix[rows])
    assert search.VectorIndex(matrix)._mapped is None  # in memory: nothing to ask for
