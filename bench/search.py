"""`python -m bench.search`: text→image top-k over 100k and 1M stored vectors.

Measures clipgram's own code path: random unit vectors are written through
`search.write_matrix` (what `publish` uses) and scored by `search.VectorIndex.top`
on the memory-mapped .npy, exactly as a search does. The baseline, in the same
process on the same vectors, is a plain `matrix @ q` + argpartition over an
in-memory array; the two run alternately, query by query, so a noisy host
slows both alike. `over_numpy` = clipgram's median query time / numpy's (goal ≤ 2).

Optionally DuckDB's vss HNSW index (metric cosine) is built over the same
vectors: build time, query time and recall@k against the exact top-k. Building
it is slow on few cores, so it runs only at the sizes given by `--hnsw-sizes`.

Random unit vectors in 512 dimensions are the hard case for an approximate
index (every distance is close to every other); CLIP embeddings cluster, which
usually helps it, so read the recall here as a floor, not a forecast. Results
merge into bench/results.json under "search".
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from bench import save_section
from clipgram import ann, catalog
from clipgram.search import VectorIndex, write_matrix

DIM = 512
K = 10
SIZES = (100_000, 1_000_000)
# Building HNSW over random 512-d vectors took ~3 minutes for 20k rows on a loaded 2-core
# host (and grows faster than linearly): 100k or 1M is far past the bench's budget there.
HNSW_SIZES = (10_000,)
ANN_SIZES = (1_000_000,)    # 10M (20 GB of vectors, an hour to build here) only when asked
QUERIES = 20
SEED = 20240601
EXTEND_SHARE = 0.01         # the approximate index extended by a publish that adds 1 % more images
CHUNK = 65_536              # rows generated (and written) at a time: memory stays flat
EF_SEARCH = 64              # vss's default candidate list size per HNSW query


def random_unit_vectors(count: int, dim: int, seed: int) -> Iterator[np.ndarray]:
    """`count` random unit float32 vectors in blocks of CHUNK rows; the same seed, the same vectors."""
    rng = np.random.default_rng(seed)
    for start in range(0, count, CHUNK):
        block = rng.standard_normal((min(CHUNK, count - start), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        yield block


def clustered_unit_vectors(count: int, dim: int, seed: int, clusters: int = 1000) -> Iterator[np.ndarray]:
    """`count` unit vectors spread as CLIP embeddings roughly are, in blocks of CHUNK rows:
    normalise(√0.45·g + √0.25·c + √0.30·e), g one direction all share (CLIP's vectors sit in
    a narrow cone), c the direction of the vector's cluster (1,000 of them, Zipf-sized: a few
    subjects fill most of a library) and e a random direction of its own. Any two vectors
    then have a cosine of about 0.45, two of a cluster about 0.7. The cluster directions come
    from a fixed seed, so stored vectors and queries (another `seed`) share them."""
    shape_rng = np.random.default_rng(SEED)
    shared = shape_rng.standard_normal(dim).astype(np.float32)
    centres = shape_rng.standard_normal((clusters, dim)).astype(np.float32)
    shared /= np.linalg.norm(shared)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sizes = 1.0 / np.arange(1, clusters + 1)
    rng = np.random.default_rng(seed)
    for start in range(0, count, CHUNK):
        rows = min(CHUNK, count - start)
        own = rng.standard_normal((rows, dim), dtype=np.float32)
        own /= np.linalg.norm(own, axis=1, keepdims=True)
        block = (np.sqrt(0.45) * shared + np.sqrt(0.25) * centres[rng.choice(clusters, rows, p=sizes / sizes.sum())]
                 + np.sqrt(0.30) * own).astype(np.float32)
        yield block / np.linalg.norm(block, axis=1, keepdims=True)


def _vector_column(block: np.ndarray) -> pa.FixedSizeListArray:
    """A (rows, dim) block as FLOAT[dim], the type the embeddings view gives publish."""
    return pa.FixedSizeListArray.from_arrays(pa.array(block.ravel()), block.shape[1])


def store_vectors(path: Path, count: int, dim: int, seed: int, make: Callable = random_unit_vectors) -> Path:
    """Write the vectors as publish does: FLOAT[dim] record batches into `write_matrix`."""
    batches = (pa.record_batch([_vector_column(b)], names=["embedding"])
               for b in make(count, dim, seed))
    return write_matrix(path, count, dim, batches)


def numpy_top(matrix: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """The baseline: exact top-k rows by dot product, best first."""
    scores = matrix @ query
    best = np.argpartition(-scores, k - 1)[:k]
    return best[np.argsort(-scores[best])]


def exact_tops(matrix: np.ndarray, queries: np.ndarray, k: int) -> list[np.ndarray]:
    """The exact top-k rows of every query in one pass over `matrix`, a block at a time: at
    10M rows (20 GB) one read for all queries, not one each."""
    queries = np.asarray(queries, dtype=np.float32)
    rows = np.zeros((len(queries), 0), dtype=np.int64)
    scores = np.zeros((len(queries), 0), dtype=np.float32)
    for start in range(0, len(matrix), 4 * CHUNK):
        block = np.asarray(matrix[start:start + 4 * CHUNK], dtype=np.float32)
        scores = np.concatenate([scores, queries @ block.T], axis=1)
        rows = np.concatenate([rows, np.broadcast_to(np.arange(start, start + len(block)), (len(queries), len(block)))], axis=1)
        keep = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # ties by row, as search's
        scores, rows = np.take_along_axis(scores, keep, 1), np.take_along_axis(rows, keep, 1)
    return list(rows)


def recall_at_k(found: list[np.ndarray], exact: list[np.ndarray]) -> float:
    """Mean over queries of |found ∩ exact| / |exact|."""
    return float(np.mean([len(np.intersect1d(f, e)) / len(e) for f, e in zip(found, exact)]))


def _rss_mb(kind: str = "RssAnon") -> float:
    """Resident memory now: RssAnon (the process's own), RssFile (pages of mapped files,
    shared with the page cache) or VmRSS (both), from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{kind}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {kind} in /proc/self/status")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1000


def time_alternately(fns: dict[str, Callable[[np.ndarray], np.ndarray]], queries: np.ndarray,
                     warmup: int = 2) -> tuple[dict[str, float], dict[str, list[np.ndarray]]]:
    """Median ms per query of each function, run in turn on every query, and their answers."""
    for query in queries[:warmup]:
        for fn in fns.values():
            fn(query)
    times: dict[str, list[float]] = {name: [] for name in fns}
    answers: dict[str, list[np.ndarray]] = {name: [] for name in fns}
    for query in queries:
        for name, fn in fns.items():
            start = time.perf_counter()
            answers[name].append(fn(query))
            times[name].append(time.perf_counter() - start)
    return {name: _median_ms(t) for name, t in times.items()}, answers


class HnswIndex:
    """DuckDB vss HNSW index (metric cosine) over an in-memory FLOAT[dim] table.

    In memory because vss persists HNSW indexes to a database file only as an
    experimental option.
    """

    def __init__(self, matrix: np.ndarray, ef_search: int = EF_SEARCH):
        self.dim = matrix.shape[1]
        self.con = duckdb.connect()
        catalog.load_extension(self.con, "vss")
        self.con.execute(f"CREATE TABLE vectors (row INTEGER, embedding FLOAT[{self.dim}])")
        for start in range(0, len(matrix), CHUNK):
            block = np.asarray(matrix[start:start + CHUNK], dtype=np.float32)
            rows = pa.table({"row": np.arange(start, start + len(block), dtype=np.int32),
                             "embedding": _vector_column(block)})
            self.con.from_arrow(rows).insert_into("vectors")
        start = time.perf_counter()
        self.con.execute("CREATE INDEX vectors_hnsw ON vectors USING HNSW (embedding) "
                         "WITH (metric = 'cosine')")
        self.build_s = time.perf_counter() - start
        self.con.execute(f"SET hnsw_ef_search = {int(ef_search)}")

    def _sql(self, query: np.ndarray, k: int) -> str:
        # The vector as a literal: bound as a parameter, a 512-float list made each query
        # about 5× slower (150 ms against 30 ms at 2k rows). Only floats go in, so it is safe.
        vector = ",".join(repr(float(x)) for x in query)
        return (f"SELECT row FROM vectors ORDER BY array_cosine_distance(embedding, "
                f"[{vector}]::FLOAT[{self.dim}]) LIMIT {int(k)}")

    def plan(self, k: int = K) -> str:
        """The physical plan of a top-k query (shows HNSW_INDEX_SCAN when the index is used)."""
        rows = self.con.execute(f"EXPLAIN {self._sql(np.zeros(self.dim), k)}").fetchall()
        return "\n".join(r[1] for r in rows)

    def top(self, query: np.ndarray, k: int = K) -> np.ndarray:
        return self.con.execute(self._sql(query, k)).fetchnumpy()["row"]

    def close(self) -> None:
        self.con.close()


def bench_hnsw(matrix: np.ndarray, queries: np.ndarray, exact: list[np.ndarray], k: int = K,
               ef_search: int = EF_SEARCH) -> dict[str, Any]:
    before = _rss_mb("VmRSS")
    index = HnswIndex(matrix, ef_search)
    try:
        if "HNSW_INDEX_SCAN" not in index.plan(k):
            raise RuntimeError("DuckDB did not use the HNSW index for a top-k query:\n" + index.plan(k))
        memory_mb = _rss_mb("VmRSS") - before
        times, answers = time_alternately({"hnsw": lambda q: index.top(q, k)}, queries)
    finally:
        index.close()
    return {"build_s": index.build_s, "query_ms": times["hnsw"], "recall_at_k": recall_at_k(
        answers["hnsw"], exact), "ef_search": ef_search, "table_and_index_rss_mb": memory_mb}


def bench_size(work: Path, count: int, queries: np.ndarray, hnsw: bool, k: int = K,
               ef_search: int = EF_SEARCH, seed: int = SEED) -> dict[str, Any]:
    """clipgram vs numpy (and optionally HNSW) over `count` random unit vectors."""
    dim = queries.shape[1]
    start = time.perf_counter()
    path = store_vectors(work / f"vectors-{count}.npy", count, dim, seed)
    write_s = time.perf_counter() - start
    mapped_before, own_before = _rss_mb("RssFile"), _rss_mb("RssAnon")
    index = VectorIndex(np.load(path, mmap_mode="r"))   # what VectorIndex.open does
    in_memory = np.array(index.matrix)                  # the baseline's own copy
    copied_mb = _rss_mb("RssAnon") - own_before
    times, answers = time_alternately({
        "clipgram": lambda q: index.top(q, k)[0],
        "numpy": lambda q: numpy_top(in_memory, q, k),
    }, queries)
    result: dict[str, Any] = {
        "rows": count, "dim": dim, "k": k, "queries": len(queries), "write_s": write_s,
        "clipgram_ms": times["clipgram"], "numpy_ms": times["numpy"],
        "over_numpy": times["clipgram"] / times["numpy"],
        # clipgram's answers must be the exact top-k: anything else is not a fair race
        "same_top_k": all(np.array_equal(a, b) for a, b in zip(answers["clipgram"], answers["numpy"])),
        "matrix_mb": path.stat().st_size / 2**20,
        # clipgram's matrix is a file map: page cache, shared between processes, reclaimable;
        # the baseline holds a private copy
        "clipgram_mapped_rss_mb": _rss_mb("RssFile") - mapped_before,
        "numpy_copy_rss_mb": copied_mb,
    }
    if hnsw:
        result["hnsw"] = bench_hnsw(in_memory, queries, answers["numpy"], k, ef_search)
    path.unlink()  # a map of it stays readable until `index` goes
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


def bench_ann(work: Path, count: int, queries: int, dim: int = DIM, k: int = K) -> dict[str, Any]:
    """clipgram's approximate index (ann.py) over `count` clustered vectors, as publish builds
    it and search uses it: build time, file size, resident memory, query time and recall@k
    against the exact scan of the same matrix; and the time a publish takes to extend it by
    EXTEND_SHARE more images."""
    added = int(count * EXTEND_SHARE)
    path = store_vectors(work / f"clustered-{count}.npy", count + added, dim, SEED, clustered_unit_vectors)
    before = _rss_mb("RssAnon")
    start = time.perf_counter()
    built = ann.build(np.load(path, mmap_mode="r")[:count], work / f"clustered-{count}{ann.SUFFIX}")
    build_s = time.perf_counter() - start
    matrix = np.load(path, mmap_mode="r")[:count]
    start = time.perf_counter()  # what a fresh `clipgram search` pays before its first query
    approximate = VectorIndex(matrix, ann.load(built, count))
    load_ms = (time.perf_counter() - start) * 1000
    query_vectors = next(clustered_unit_vectors(queries, dim, SEED + 1))
    times: list[float] = []
    found = []
    for q in query_vectors:
        started = time.perf_counter()
        found.append(approximate.top(q, k)[0])
        times.append(time.perf_counter() - started)
    truth = exact_tops(matrix, query_vectors, k)
    result = {"rows": count, "dim": dim, "queries": queries, "nprobe": ann.nprobe_for(approximate.approximate),
              "build_s": round(build_s, 1), "load_ms": round(load_ms, 1), "index_mb": round(built.stat().st_size / 2**20, 1),
              "p50_ms": round(float(np.percentile(times, 50)) * 1000, 2),
              "p95_ms": round(float(np.percentile(times, 95)) * 1000, 2),
              "recall_at_10": round(recall_at_k(found, truth), 3),
              "index_rss_mb": round(_rss_mb("RssAnon") - before, 1), "peak_rss_mb": round(_peak_rss_mb(), 1)}
    start = time.perf_counter()
    extended = ann.extend(built, np.load(path, mmap_mode="r"), work / f"extended-{count}{ann.SUFFIX}")
    result.update(extend_rows=added, extend_s=round(time.perf_counter() - start, 1))
    for file in (path, built, extended):
        file.unlink()
    return result


def run(sizes: tuple[int, ...] = SIZES, hnsw_sizes: tuple[int, ...] = HNSW_SIZES,
        queries: int = QUERIES, dim: int = DIM, k: int = K, ef_search: int = EF_SEARCH,
        ann_sizes: tuple[int, ...] = ANN_SIZES) -> dict[str, Any]:
    """The search benchmark at each size (HNSW too at `hnsw_sizes`, clipgram's approximate
    index at `ann_sizes`); `make bench` stores this under results["search"], keyed by size."""
    # queries come from their own seed: none of them is a stored vector
    query_vectors = next(random_unit_vectors(queries, dim, SEED + 1))
    all_sizes = sorted(set(sizes) | set(hnsw_sizes))
    results: dict[str, Any] = {"sizes": all_sizes, "hnsw_sizes": sorted(set(hnsw_sizes))}
    with tempfile.TemporaryDirectory(prefix="clipgram-bench-search-") as work:
        for count in all_sizes:
            print(f"search: {count:,} vectors of {dim} dims …", flush=True)
            results[str(count)] = bench_size(Path(work), count, query_vectors, count in hnsw_sizes,
                                              k, ef_search)
            print(json.dumps(results[str(count)]), flush=True)
        results["ann"] = {}
        for count in ann_sizes:
            print(f"search: approximate index over {count:,} clustered vectors …", flush=True)
            results["ann"][str(count)] = bench_ann(Path(work), count, queries, dim, k)
            print(json.dumps(results["ann"][str(count)]), flush=True)
        results["ann"]["goals"] = {"p50_ms": 10, "recall_at_10": 0.95}
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="vector counts")
    parser.add_argument("--hnsw-sizes", type=int, nargs="*", default=list(HNSW_SIZES),
                        help="sizes at which to build and query the HNSW index too (none: skip it)")
    parser.add_argument("--ef-search", type=int, default=EF_SEARCH, help="HNSW candidate list size")
    parser.add_argument("--ann-sizes", type=int, nargs="*", default=list(ANN_SIZES),
                        help="sizes at which to build and query the approximate index (10000000: opt-in)")
    parser.add_argument("--queries", type=int, default=QUERIES)
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    args = parser.parse_args(argv)
    save_section(args.out, "search", run(tuple(args.sizes), tuple(args.hnsw_sizes), args.queries,
                                         ef_search=args.ef_search, ann_sizes=tuple(args.ann_sizes)))


if __name__ == "__main__":
    main()
