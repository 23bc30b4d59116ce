"""Duplicates: the same file posted more than once (same sha256), and near-duplicates
(stored embeddings within a cosine threshold, grouped transitively)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clipgram import catalog
from clipgram.analysis import derived
from clipgram.result import StageResult

BLOCK = 4096   # rows of the similarity matrix computed at once: memory stays at BLOCK × n floats


def near_groups(x: np.ndarray, threshold: float) -> list[list[int]]:
    """Groups (of 2 or more row indices) linked by cosine ≥ `threshold`, via union-find."""
    parent = list(range(len(x)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, len(x), BLOCK):
        sims = x[start:start + BLOCK] @ x.T
        for i, j in zip(*np.nonzero(sims >= threshold)):
            a, b = root(start + int(i)), root(int(j))
            if a != b:
                parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(len(x)):
        groups.setdefault(root(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def run(data_dir: Path, model: str, account: str | None, threshold: float) -> StageResult:
    """Write the `duplicates` table for `account` (or across every account)."""
    scope = account or derived.ALL_ACCOUNTS
    with catalog.connect(data_dir) as con:
        media = con.execute(
            "SELECT sha256, media_id, account FROM images WHERE ? IS NULL OR account = ? "
            "ORDER BY sha256, media_id", [account, account]).fetchall()
    by_sha: dict[str, list[tuple[str, str]]] = {}
    for sha, media_id, acct in media:
        by_sha.setdefault(sha, []).append((media_id, acct))
    rows, group_id = [], 0
    for sha, items in by_sha.items():
        if len(items) > 1:
            group_id += 1
            rows += [{"group_id": group_id, "kind": "exact", "media_id": m, "account": a, "sha256": sha,
                      "similarity": 1.0} for m, a in items]
    shas, x = derived.stored_vectors(data_dir, model, account)
    for group in near_groups(x, threshold) if shas else []:
        group_id += 1
        first = x[group[0]]
        rows += [{"group_id": group_id, "kind": "near", "media_id": m, "account": a, "sha256": shas[i],
                  "similarity": float(x[i] @ first)}
                 for i in group for m, a in by_sha.get(shas[i], [])]
    derived.replace(data_dir, derived.DUPLICATES, scope, model, rows)
    return StageResult("duplicates", scope, done=group_id,
                       note=f"groups (cosine ≥ {threshold} or same file)").log()
