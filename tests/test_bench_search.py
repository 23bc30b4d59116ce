"""The search benchmark measures clipgram's real path and compares like with like."""

import json

import numpy as np

from bench import search as bench_search
from clipgram.search import VectorIndex

N = 2000


def test_stored_matrix_is_the_generated_unit_vectors_and_clipgram_finds_the_exact_top_k(tmp_path):
    path = bench_search.store_vectors(tmp_path / "v.npy", N, 512, seed=7)
    vectors = np.concatenate(list(bench_search.random_unit_vectors(N, 512, seed=7)))
    stored = np.load(path, mmap_mode="r")
    assert stored.shape == (N, 512) and stored.dtype == np.float32
    np.testing.assert_array_equal(stored, vectors)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)

    index = VectorIndex(stored)
    for query in next(bench_search.random_unit_vectors(5, 512, seed=8)):
        exact = np.argsort(-(vectors.astype(np.float64) @ query))[:10]  # independent of both
        np.testing.assert_array_equal(index.top(query, 10)[0], exact)
        np.testing.assert_array_equal(bench_search.numpy_top(vectors, query, 10), exact)


def test_recall_at_k_is_the_mean_overlap_with_the_exact_top_k():
    found = [np.array([1, 2, 3]), np.array([4, 5, 6])]
    exact = [np.array([3, 2, 9]), np.array([7, 8, 4])]
    assert bench_search.recall_at_k(found, exact) == (2 / 3 + 1 / 3) / 2
    assert bench_search.recall_at_k(exact, exact) == 1.0


def test_bench_size_races_clipgram_against_numpy_and_scores_hnsw_recall(tmp_path):
    queries = next(bench_search.random_unit_vectors(8, 512, seed=9))
    result = bench_search.bench_size(tmp_path, N, queries, hnsw=True, ef_search=256)

    assert result["same_top_k"] is True
    assert result["clipgram_ms"] > 0 and result["numpy_ms"] > 0
    assert result["over_numpy"] == result["clipgram_ms"] / result["numpy_ms"]
    assert abs(result["matrix_mb"] - N * 512 * 4 / 2**20) < 0.01  # + the .npy header
    hnsw = result["hnsw"]
    assert hnsw["build_s"] > 0 and hnsw["ef_search"] == 256
    assert 0.9 <= hnsw["recall_at_k"] <= 1.0
    assert not list(tmp_path.glob("*.npy"))  # the 2 GB matrix of a real run does not linger


def test_hnsw_index_answers_from_the_index_and_its_recall_matches_its_answers():
    vectors = np.concatenate(list(bench_search.random_unit_vectors(500, 64, seed=3)))
    queries = next(bench_search.random_unit_vectors(10, 64, seed=4))
    index = bench_search.HnswIndex(vectors, ef_search=128)
    try:
        assert "HNSW_INDEX_SCAN" in index.plan()
        found = [index.top(q, 10) for q in queries]
    finally:
        index.close()
    exact = [bench_search.numpy_top(vectors, q, 10) for q in queries]
    assert all(len(f) == 10 and len(set(f.tolist())) == 10 for f in found)
    assert bench_search.recall_at_k(found, exact) >= 0.9


def test_main_merges_its_results_into_an_existing_results_file(tmp_path):
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"embed": {"e2e_ips": 1.0}}))
    bench_search.main(["--sizes", "500", "--hnsw-sizes", "--queries", "4", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["embed"] == {"e2e_ips": 1.0}
    assert results["search"]["sizes"] == [500] and results["search"]["hnsw_sizes"] == []
    assert results["search"]["500"]["same_top_k"] is True
    assert "hnsw" not in results["search"]["500"]
