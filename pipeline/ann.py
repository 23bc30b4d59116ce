"""The approximate index of a big library's vectors: faiss IVF over 8-bit scalar-quantised
vectors (`IVF<4√N>,SQ8`, inner product), built by publish once the searchable images reach
`[search] ann_threshold`; below it the exact scan of the memory-mapped matrix is fast enough.

Chosen by measurement on clustered vectors with the spread of CLIP's (README, "Search at
scale"): at 200k, IVF-SQ8 found 0.976 of the exact top-10 in 1.2 ms at NPROBE 64, where
IVF-PQ (64 bytes a vector) found 0.71 and usearch's HNSW over int8 0.70. A search asks it for
CANDIDATES rows and ranks those again with the full-precision matrix, so every score is exact
and only which rows are considered is approximate. A filter's rows go to faiss as a bitmap
selector; a filter that leaves fewer than EXACT_BELOW rows, or an index that finds fewer than
k of them, is answered by the exact scan of those rows. The file is named by the vectors it
holds, so a republish that changes no vector keeps it, and a publish that only appends rows
(publish keeps each image's row) adds them to the previous index's lists instead of training
new ones, until the library has doubled; a file that is missing or does not read means the
exact scan, never a wrong answer.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SUFFIX = ".faiss"
NPROBE = 64             # lists visited per query at least, and one in PROBE_SHARE of them:
PROBE_SHARE = 32        # at 1M (4,000 lists) 64 found 0.94 of the exact top-10, 128 more (README)
CANDIDATES = 100        # rows re-ranked exactly, at least; 4·k for a bigger k
EXACT_BELOW = 20_000    # a filter leaving fewer rows is scanned exactly (2 ms at 512-d)
TRAIN_PER_LIST = 40     # k-means sample: faiss wants 30 to 256 points per list
CHUNK = 65_536
GROWTH = 2            # an index is extended until the library doubles, then built anew


def lists_for(count: int) -> int:
    return max(1, min(int(4 * math.sqrt(count)), count // TRAIN_PER_LIST))


def build(matrix: np.ndarray, path: Path) -> Path:
    """Train and fill an IVF-SQ8 index over the (N, d) unit-vector matrix; write it atomically."""
    import faiss

    count, dim = matrix.shape
    nlist = lists_for(count)
    index = faiss.index_factory(dim, f"IVF{nlist},SQ8", faiss.METRIC_INNER_PRODUCT)
    sample = np.sort(np.random.default_rng(0).choice(count, min(count, TRAIN_PER_LIST * nlist), replace=False))
    index.train(np.ascontiguousarray(matrix[sample], dtype=np.float32))
    return _fill(index, matrix, path)


def extendable(previous: Path, count: int) -> int | None:
    """How many rows the index at `previous` holds, when rows appended to them up to `count`
    can go into its lists as they are; None when it does not read, or when the library has
    more than doubled since its lists were drawn (they would grow long and unbalanced)."""
    import faiss

    try:
        index = faiss.read_index(str(previous), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        return None
    if index.ntotal > count or lists_for(count) ** 2 > GROWTH * index.nlist ** 2:
        return None
    return int(index.ntotal)


def extend(previous: Path, matrix: np.ndarray, path: Path) -> Path:
    """The index at `previous` (over the first rows of `matrix`) with the rest of `matrix`
    added to its lists, written to `path`; `previous` stays as it was."""
    import faiss

    return _fill(faiss.read_index(str(previous)), matrix, path)


def _fill(index: Any, matrix: np.ndarray, path: Path) -> Path:
    """Add the rows of `matrix` past those `index` holds, a block at a time (from the memory
    map), and write it atomically."""
    import faiss

    for start in range(index.ntotal, len(matrix), CHUNK):
        index.add(np.ascontiguousarray(matrix[start:start + CHUNK], dtype=np.float32))
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    faiss.write_index(index, str(partial))
    partial.replace(path)
    return path


@dataclass
class Ann:
    index: Any   # faiss.IndexIVF
    rows: int

    def candidates(self, query: np.ndarray, count: int, allowed: np.ndarray | None = None) -> np.ndarray:
        """Up to `count` rows nearest `query` by the index, among `allowed` rows when given."""
        import faiss

        # a filter thins every list: the filtered top-k lie in more of them, so visit more
        share = 1.0 if allowed is None else max(len(allowed), 1) / self.rows
        params = faiss.SearchParametersIVF(nprobe=min(self.index.nlist, round(nprobe_for(self) / max(share, 1 / 8))))
        if allowed is not None:
            bits = np.zeros(self.rows, dtype=bool)
            bits[allowed] = True
            packed = np.packbits(bits, bitorder="little")  # faiss reads bit i of byte i // 8
            params.sel = faiss.IDSelectorBitmap(len(packed), faiss.swig_ptr(packed))
        _, found = self.index.search(np.ascontiguousarray(query[None], dtype=np.float32), count, params=params)
        return found[0][found[0] >= 0]


def nprobe_for(found: Ann) -> int:
    return min(found.index.nlist, max(NPROBE, found.index.nlist // PROBE_SHARE))


_LOADED: dict[tuple[str, int], tuple[int, Ann | None]] = {}


def load(path: Path, rows: int) -> Ann | None:
    """The index at `path` for a matrix of `rows` rows (kept per process while the file is the
    same); None when there is none or it does not read as one."""
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        return None
    key = str(path), rows
    if _LOADED.get(key, (None,))[0] != stamp:
        import faiss

        try:
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
            found = Ann(index, rows) if index.ntotal == rows and index.metric_type == faiss.METRIC_INNER_PRODUCT else None
        except RuntimeError:  # faiss reports a torn or foreign file so
            found = None
        _LOADED[key] = stamp, found
    return _LOADED[key][1]
