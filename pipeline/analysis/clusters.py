"""Groups of similar images: spherical k-means on stored embeddings, k chosen by silhouette,
each cluster named by the words that set its captions and hashtags apart (class-based TF-IDF)."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

from clipgram import catalog
from clipgram.analysis import derived, fits, labels
from clipgram.result import StageResult

SILHOUETTE_SAMPLE = 2000    # silhouette is O(n²): score a fixed sample beyond this
SILHOUETTE_SLACK = 0.05     # choose_k: how much worse separated a finer grouping may be
_WORD = re.compile(r"[a-z][a-z0-9_]{2,}")
# English function words and the fillers of captions and posts ("a photo of", "link in bio"):
# c-TF-IDF already discounts words every cluster uses, these never name anything
_STOPWORDS = set("""the and for with this that from are was were has have had not but you your our
its it's all one new can just into out off over more most some any very own on of in at to by an
background image photo picture may be what who how when where why they them their there here his
her him she he we us me my mine will would could should about than then too also only even still
get got like love day today time way make made see look looking link bio follow post posted
shot taken showing shows view""".split())


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
    """The largest k in 2..k_max whose silhouette is within SILHOUETTE_SLACK of the best, and every
    k's silhouette. The best alone is 2 for most libraries (two broad halves, which share nothing
    to be named by); a finer grouping almost as well separated names what its groups hold."""
    scores = {k: silhouette(x, kmeans(x, k)[0]) for k in range(2, min(k_max, len(x) - 1) + 1)}
    if not scores:
        return 1, {}
    best = max(scores.values())
    return max(k for k, score in scores.items() if score >= best - SILHOUETTE_SLACK), scores


def name_clusters(docs: list[str], assign: np.ndarray, words: int = 3) -> dict[int, str]:
    """Each cluster's `words` most distinctive words, by class-based TF-IDF (BERTopic's c-TF-IDF):
    a word's share of the cluster's words × log(1 + average words per cluster / the word's count
    in the whole library). A word every cluster uses often ("shape", a filler) scores low; one
    that sets a cluster apart scores high though it is not its most frequent."""
    counts: dict[int, Counter] = {}
    for doc, cluster in zip(docs, assign.tolist()):
        counts.setdefault(cluster, Counter()).update(
            w for w in _WORD.findall(doc.lower()) if w not in _STOPWORDS)
    overall = Counter()
    for counter in counts.values():
        overall.update(counter)
    # a plural counts as its singular when the library uses both ("circles", "circle")
    plural = {w: w[:-1] for w in overall if w.endswith("s") and w[:-1] in overall}
    for counter in [*counts.values(), overall]:
        for word, singular in plural.items():
            if word in counter:
                counter[singular] += counter.pop(word)
    average = sum(overall.values()) / max(len(counts), 1)
    names = {}
    for cluster, counter in counts.items():
        total = sum(counter.values()) or 1
        score = {w: n / total * math.log(1 + average / overall[w]) for w, n in counter.items()}
        ranked = sorted(score, key=lambda w: (-score[w], w))
        names[cluster] = " ".join(ranked[:words]) or f"cluster {cluster}"
    for cluster in set(assign.tolist()) - set(names):
        names[cluster] = f"cluster {cluster}"
    return names


def documents(data_dir: Path, shas: list[str], model: str) -> list[str]:
    """Per image: generated caption, post captions and hashtags of every post that shows it, and
    its best label of each zero-shot label set the library speaks of: one whose labels are, for
    half of them or more, words of its captions. Another set would name clusters all the same
    (the shipped "posture" on pictures of shapes: "blue circle lying")."""
    with catalog.connect(data_dir) as con:
        text = dict(con.execute("""
            SELECT sha256, string_agg(generated_caption || ' ' || post_caption || ' ' || hashtags, ' ')
            FROM documents GROUP BY sha256""").fetchall())
    vocabulary = {word for doc in text.values() for word in _WORD.findall(doc.lower())}
    best: dict[str, list[str]] = {}
    for name, label_set in labels.load_sets(data_dir).items():
        if 2 * sum(label.lower() in vocabulary for label in label_set.labels) < len(label_set.labels):
            continue
        for row in derived.read(data_dir, derived.LABELS, name, model, ["sha256", "label"], [("rank", "=", 1)]):
            best.setdefault(row["sha256"], []).append(row["label"])
    return [" ".join([text.get(sha, ""), *best.get(sha, [])]) for sha in shas]


def _rows(shas: list[str], assign: np.ndarray, similarity: np.ndarray, names: dict[int, str],
          quality: float) -> list[dict]:
    return [{"sha256": sha, "cluster": int(c), "cluster_name": names[int(c)], "similarity": float(s),
             "silhouette": quality} for sha, c, s in zip(shas, assign.tolist(), similarity.tolist())]


def run(data_dir: Path, model: str, account: str | None, k: int | None, k_max: int = 12,
        config: dict | None = None) -> StageResult:
    """Cluster the account's (or every account's) images anew; k=None chooses k by silhouette.
    The centres and names are kept (fits) for `extend`, with the analyse stage's `config`."""
    found = derived.vectors(data_dir, model, account)
    shas, x = found.shas, found.of()
    scope = account or derived.ALL_ACCOUNTS
    if len(shas) < 3:
        raise derived.AnalysisError(f"{len(shas)} embedded image(s) in {derived.scope_label(scope)}: "
                         f"clustering needs 3 or more")
    note = ""
    if k is None:
        k, tried = choose_k(x, k_max)
        note = "k chosen by silhouette: " + ", ".join(f"{n}→{s:.3f}" for n, s in tried.items())
    k = min(k, len(shas))
    assign, centres = kmeans(x, k)
    quality = silhouette(x, assign) if k > 1 else 0.0
    names = name_clusters(documents(data_dir, shas, model), assign)
    renamed = _carry_renames(fits.load(data_dir, "clusters", scope, model), centres)
    names.update(renamed)
    similarity = np.sum(x * centres[assign], axis=1)
    derived.replace(data_dir, derived.CLUSTERS, scope, model, _rows(shas, assign, similarity, names, quality))
    fits.save(data_dir, "clusters", scope, model, fits.Fit(
        {"images": len(shas), "k": k, "silhouette": quality, "names": [names[c] for c in range(k)],
         "renamed": {str(c): name for c, name in renamed.items()}, **fits.config_meta(config)},
        {"centres": centres.astype(np.float32)}))
    return StageResult("clusters", derived.scope_label(scope), done=len(shas),
                       note=f"k={k}, silhouette {quality:.3f}" + (f"; {note}" if note else ""))


RENAME_KEPT = 0.9  # cosine between an old centre and a new one at or above which a rename carries over


def _carry_renames(previous: fits.Fit | None, centres: np.ndarray) -> dict[int, str]:
    """The names people gave clusters of the previous fit, on the new clusters they became: the
    one whose centre is nearest the old centre, when it is that close."""
    if previous is None or not previous.meta.get("renamed"):
        return {}
    carried: dict[int, str] = {}
    old = previous.arrays["centres"]
    for cluster, name in previous.meta["renamed"].items():
        if int(cluster) >= len(old) or old.shape[1] != centres.shape[1]:
            continue
        closeness = centres @ old[int(cluster)]
        best = int(np.argmax(closeness))
        if closeness[best] >= RENAME_KEPT and best not in carried:
            carried[best] = name
    return carried


def rename(data_dir: Path, model: str, account: str | None, cluster: int, name: str) -> StageResult:
    """Name `cluster` `name`: in the table now, and in the fit, so that new images placed in it
    and later fits (whose nearest cluster it becomes) keep the name."""
    scope = account or derived.ALL_ACCOUNTS
    fit = fits.load(data_dir, "clusters", scope, model)
    if fit is None or not 0 <= cluster < len(fit.meta["names"]):
        known = len(fit.meta["names"]) if fit else 0
        raise derived.AnalysisError(f"no cluster {cluster} in {derived.scope_label(scope)}: "
                         + (f"it has clusters 0 to {known - 1}" if known else "it has no clusters yet: run `clipgram analyse`"))
    names = [name if i == cluster else n for i, n in enumerate(fit.meta["names"])]
    fits.save(data_dir, "clusters", scope, model, fits.Fit(
        {**fit.meta, "names": names, "renamed": {**fit.meta.get("renamed", {}), str(cluster): name}}, fit.arrays))
    rows = derived.read(data_dir, derived.CLUSTERS, scope, model, list(derived.CLUSTERS.schema.names))
    derived.replace(data_dir, derived.CLUSTERS, scope, model,
                    [{**r, "cluster_name": names[r["cluster"]]} for r in rows])
    return StageResult("clusters", derived.scope_label(scope), done=sum(r["cluster"] == cluster for r in rows),
                       note=f"cluster {cluster} named {name!r}")


def extend(data_dir: Path, model: str, scope: str, found: derived.Vectors, new: list[int],
           fit: fits.Fit) -> int:
    """Put the images at positions `new` of `found` in the nearest stored cluster; keeps every
    name (a cluster is named when it is fitted). Returns how many were placed."""
    x = found.of(new)
    centres = fit.arrays["centres"]
    assign = np.argmax(x @ centres.T, axis=1)
    similarity = np.sum(x * centres[assign], axis=1)
    names = dict(enumerate(fit.meta["names"]))
    derived.append(data_dir, derived.CLUSTERS, scope, model,
                   _rows([found.shas[i] for i in new], assign, similarity, names, fit.meta["silhouette"]))
    return len(new)
