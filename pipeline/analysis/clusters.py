"""Groups of similar images: spherical k-means on stored embeddings, k chosen by silhouette,
each cluster named by the words that set its captions and hashtags apart (class-based TF-IDF)."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

from clipgram import catalog
from clipgram.analysis import derived
from clipgram.result import StageResult

SILHOUETTE_SAMPLE = 2000    # silhouette is O(n²): score a fixed sample beyond this
_WORD = re.compile(r"[a-z][a-z0-9_]{2,}")
_STOPWORDS = set("""the and for with this that from are was were has have had not but you your our
its it's all one new can just into out off over more most some any very own on of in at to by an
background image photo picture may be""".split())


def kmeans(x: np.ndarray, k: int, seed: int = 0, iterations: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means (cosine) with k-means++ seeding: (assignments, unit centres)."""
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        distance = np.clip(1 - np.max(x @ np.stack(centres).T, axis=1), 0, None)
        total = distance.sum()
        centres.append(x[rng.choice(len(x), p=distance / total) if total > 0 else rng.integers(len(x))])
    c = np.stack(centres)
    assign = np.zeros(len(x), dtype=np.int64)
    for step in range(iterations):
        new = np.argmax(x @ c.T, axis=1)
        if step and np.array_equal(new, assign):
            break
        assign = new
        for j in range(k):
            members = x[assign == j]
            if len(members):  # an emptied cluster keeps its centre
                mean = members.sum(axis=0)
                c[j] = mean / (np.linalg.norm(mean) or 1.0)
    return assign, c


def silhouette(x: np.ndarray, assign: np.ndarray, seed: int = 0) -> float:
    """Mean silhouette with cosine distance (on a sample when there are many images)."""
    if len(x) > SILHOUETTE_SAMPLE:
        keep = np.random.default_rng(seed).choice(len(x), SILHOUETTE_SAMPLE, replace=False)
        x, assign = x[keep], assign[keep]
    distance = 1 - x @ x.T
    scores = []
    for i in range(len(x)):
        same = assign == assign[i]
        if same.sum() <= 1:
            scores.append(0.0)  # a singleton's silhouette is 0 by convention
            continue
        a = distance[i, same].sum() / (same.sum() - 1)
        b = min(distance[i, assign == j].mean() for j in np.unique(assign) if j != assign[i])
        scores.append((b - a) / max(a, b) if max(a, b) > 0 else 0.0)
    return float(np.mean(scores))


def choose_k(x: np.ndarray, k_max: int) -> tuple[int, dict[int, float]]:
    """The k in 2..k_max with the best silhouette, and every k's silhouette."""
    scores = {k: silhouette(x, kmeans(x, k)[0]) for k in range(2, min(k_max, len(x) - 1) + 1)}
    if not scores:
        return 1, {}
    return max(scores, key=lambda k: (scores[k], -k)), scores


def name_clusters(docs: list[str], assign: np.ndarray, words: int = 3) -> dict[int, str]:
    """Each cluster's `words` most distinctive words: frequency in the cluster × log(clusters / clusters using it)."""
    counts: dict[int, Counter] = {}
    for doc, cluster in zip(docs, assign.tolist()):
        counts.setdefault(cluster, Counter()).update(
            w for w in set(_WORD.findall(doc.lower())) if w not in _STOPWORDS)
    spread = Counter(w for c in counts.values() for w in c)
    names = {}
    for cluster, counter in counts.items():
        ranked = sorted(counter, key=lambda w: (-counter[w] * math.log(1 + len(counts) / spread[w]), w))
        names[cluster] = " ".join(ranked[:words]) or f"cluster {cluster}"
    return names


def documents(data_dir: Path, shas: list[str]) -> list[str]:
    """Per image: generated caption, post captions and hashtags of every post that shows it."""
    with catalog.connect(data_dir) as con:
        text = dict(con.execute("""
            SELECT sha256, string_agg(generated_caption || ' ' || post_caption || ' ' || hashtags, ' ')
            FROM documents GROUP BY sha256""").fetchall())
    return [text.get(sha, "") for sha in shas]


def run(data_dir: Path, model: str, account: str | None, k: int | None, k_max: int = 12) -> StageResult:
    """Cluster the account's (or every account's) images; k=None chooses k by silhouette."""
    shas, x = derived.stored_vectors(data_dir, model, account)
    scope = account or derived.ALL_ACCOUNTS
    if len(shas) < 3:
        raise ValueError(f"{len(shas)} embedded image(s) in {scope}: clustering needs 3 or more")
    note = ""
    if k is None:
        k, tried = choose_k(x, k_max)
        note = "k chosen by silhouette: " + ", ".join(f"{n}→{s:.3f}" for n, s in tried.items())
    k = min(k, len(shas))
    assign, centres = kmeans(x, k)
    quality = silhouette(x, assign) if k > 1 else 0.0
    names = name_clusters(documents(data_dir, shas), assign)
    similarity = np.sum(x * centres[assign], axis=1)
    derived.replace(data_dir, derived.CLUSTERS, scope, model, [
        {"sha256": sha, "cluster": int(c), "cluster_name": names[int(c)], "similarity": float(s),
         "silhouette": quality}
        for sha, c, s in zip(shas, assign.tolist(), similarity.tolist())])
    return StageResult("clusters", scope, done=len(shas), note=f"k={k}, silhouette {quality:.3f}"
                       + (f"; {note}" if note else "")).log()
