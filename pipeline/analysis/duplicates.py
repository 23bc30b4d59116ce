"""Duplicates: the same file posted more than once (same sha256), and near-duplicates
(stored embeddings within a cosine threshold, grouped transitively)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clipgram import catalog, search
from clipgram.analysis import derived, fits
from clipgram.result import StageResult

BLOCK = 4096   # rows of the similarity matrix computed at once: memory stays at BLOCK × n floats


class _Links:
    """Union-find over the row indices that were ever linked (a few, among a library's rows)."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def root(self, i: int) -> int:
        parent = self.parent
        while parent.get(i, i) != i:
            parent[i] = parent.get(parent[i], parent[i])
            i = parent[i]
        return i

    def link(self, i: int, j: int) -> None:
        a, b = self.root(i), self.root(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)
            self.parent.setdefault(min(a, b), min(a, b))

    def groups(self) -> list[list[int]]:
        found: dict[int, list[int]] = {}
        for i in sorted(self.parent):
            found.setdefault(self.root(i), []).append(i)
        return [g for g in found.values() if len(g) > 1]


def _link_close(links: _Links, x: np.ndarray, queries: np.ndarray, positions: np.ndarray,
                threshold: float) -> None:
    """Link each of `queries` (rows `positions` of `x`) to every row of `x` within `threshold`."""
    for start in range(0, len(queries), BLOCK):
        sims = queries[start:start + BLOCK] @ x.T
        for i, j in zip(*np.nonzero(sims >= threshold)):
            links.link(int(positions[start + int(i)]), int(j))


def near_groups(x: np.ndarray, threshold: float) -> list[list[int]]:
    """Groups (of 2 or more row indices) linked by cosine ≥ `threshold`, via union-find."""
    links = _Links()
    _link_close(links, x, x, np.arange(len(x)), threshold)
    return links.groups()


def _write(data_dir: Path, model: str, scope: str, found: derived.Vectors, x: np.ndarray,
           near: list[list[int]], threshold: float, config: dict | None = None) -> StageResult:
    """The exact groups (the same file in several posts) and the `near` ones, as the table."""
    account = None if scope == derived.ALL_ACCOUNTS else scope
    near_shas = sorted({found.shas[i] for group in near for i in group})
    in_scope = "TRUE" if account is None else f"account = {search.one_of([account])}"
    with catalog.connect(data_dir) as con:  # documents: one row per image, a table (images is a view)
        exact = con.execute(f"""
            SELECT sha256, list(media_id ORDER BY media_id), list(account ORDER BY media_id) FROM documents
            WHERE {in_scope} GROUP BY sha256 HAVING count(*) > 1 ORDER BY sha256""").fetchall()
        media = con.execute(f"""
            SELECT sha256, media_id, account FROM documents
            WHERE {in_scope} AND sha256 IN {search.one_of(near_shas or [''])}
            ORDER BY sha256, media_id""").fetchall()
    by_sha: dict[str, list[tuple[str, str]]] = {}
    for sha, media_id, acct in media:
        by_sha.setdefault(sha, []).append((media_id, acct))
    rows, group_id = [], 0
    for sha, media_ids, accounts in exact:
        group_id += 1
        rows += [{"group_id": group_id, "kind": "exact", "media_id": m, "account": a, "sha256": sha,
                  "similarity": 1.0} for m, a in zip(media_ids, accounts)]
    for group in sorted(near):
        group_id += 1
        first = x[group[0]]
        rows += [{"group_id": group_id, "kind": "near", "media_id": m, "account": a, "sha256": found.shas[i],
                  "similarity": float(x[i] @ first)}
                 for i in group for m, a in by_sha.get(found.shas[i], [])]
    derived.replace(data_dir, derived.DUPLICATES, scope, model, rows)
    # the config the analyse stage fitted it with, kept by extend (see stages/analyse.py)
    meta = {"images": len(found.shas), "threshold": threshold, **fits.config_meta(config)}
    fits.save(data_dir, "duplicates", scope, model, fits.Fit(meta, {}))
    return StageResult("duplicates", derived.scope_label(scope), done=group_id,
                       note=f"groups (cosine ≥ {threshold} or same file)")


def run(data_dir: Path, model: str, account: str | None, threshold: float,
        config: dict | None = None) -> StageResult:
    """Write the `duplicates` table for `account` (or across every account)."""
    found = derived.vectors(data_dir, model, account)
    x = found.of()
    return _write(data_dir, model, account or derived.ALL_ACCOUNTS, found, x,
                  near_groups(x, threshold) if found.shas else [], threshold, config)


def extend(data_dir: Path, model: str, scope: str, found: derived.Vectors, new: list[int],
           fit: fits.Fit) -> int:
    """Bring the groups up to date with the images at positions `new` of `found`: each is compared
    with every image, and the stored groups are kept (linked anew, not recomputed)."""
    threshold = fit.meta["threshold"]
    position = {sha: i for i, sha in enumerate(found.shas)}
    links = _Links()
    stored = derived.read(data_dir, derived.DUPLICATES, scope, model, ["group_id", "kind", "sha256"])
    first: dict[int, int] = {}
    for row in stored:
        if row["kind"] == "near" and row["sha256"] in position:
            links.link(first.setdefault(row["group_id"], position[row["sha256"]]), position[row["sha256"]])
    x = found.of()
    _link_close(links, x, x[new], np.asarray(new), threshold)
    _write(data_dir, model, scope, found, x, links.groups(), threshold, fit.meta.get("config"))
    return len(new)
