"""Which results of a text search match it, judged per query and per image.

A fixed cosine threshold does not work (what matches one query scores below what fails
another), and neither does a gap in one query's ranked scores (a query that nothing matches
still has a best result and a gap somewhere). So each result is judged against how well the
library's own words describe that image: an image matches a query of n words when the query
describes it about as well as the best of the n-word beginnings of the library's generated
captions ("a red square" against "a blue circle", "a red circle", "a red square", …):

    cos(image, query) ≥ max over bank_n of cos(image, text) − 1 / logit_scale

The margin is one logit of the model's own softmax: the query may be at most e times less
likely than the library's best description of the image at its length. The bank is the
BANK_SIZE most common n-word caption beginnings for each n up to MAX_WORDS, encoded once by
the analyse stage (a fit: `relevance-<model>.parquet`), so a search only multiplies its
hits' vectors by one small matrix. Measured on the stand-ins in `make bench` (`query`).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from clipgram.analysis import derived, fits

ANALYSIS = "relevance"
MAX_WORDS = 8         # longer queries are judged against whole captions of up to this length
BANK_SIZE = 1024      # caption beginnings per length: the library's vocabulary of descriptions
_WORD = re.compile(r"\S+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def banks(captions: Sequence[str], size: int = BANK_SIZE) -> dict[int, list[str]]:
    """For each n ≤ MAX_WORDS, the `size` most common n-word caption beginnings (a caption
    shorter than n counts whole), most common first, ties by text; {} without captions."""
    counts: dict[int, Counter] = {n: Counter() for n in range(1, MAX_WORDS + 1)}
    for split in filter(None, map(words, captions)):
        for n, counter in counts.items():
            counter[" ".join(split[:n])] += 1
    return {n: [text for text, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]
            for n, c in counts.items() if c}


@dataclass(frozen=True)
class Cutoff:
    banks: dict[int, np.ndarray]    # n → (texts, d) unit vectors
    margin: float                   # cosine: 1 / the model's logit scale

    def judge(self, query_words: int, vectors: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Whether each image (unit `vectors`, its `scores` against the query) matches a
        query of `query_words` words."""
        bank = self.banks[min(max(query_words, 1), MAX_WORDS)]
        best = (np.asarray(vectors, dtype=np.float32) @ bank.T).max(axis=1)
        return np.asarray(scores) >= best - self.margin


def fit(data_dir: Path, model: str, captioner: str, captions: Sequence[str],
        encode: Callable[[list[str]], np.ndarray], logit_scale: float) -> fits.Fit:
    """Encode the caption banks of the library (whole library: one fit per model)."""
    texts = banks(captions)
    found = fits.Fit({"images": len(captions), "captioner": captioner, "logit_scale": logit_scale,
                      "texts": {str(n): t for n, t in texts.items()}},
                     {f"bank_{n}": encode(t).astype(np.float32) for n, t in texts.items()})
    fits.save(data_dir, ANALYSIS, derived.ALL_ACCOUNTS, model, found)
    return found


def cutoff(found: fits.Fit) -> Cutoff:
    return Cutoff({int(name.removeprefix("bank_")): array for name, array in found.arrays.items()},
                  1.0 / float(found.meta["logit_scale"]))


_LOADED: dict[tuple[str, str], tuple[float, Cutoff | None]] = {}


def load(data_dir: Path, model: str) -> Cutoff | None:
    """The library's cutoff for `model`, or None before the analyse stage fitted one (no
    captions yet); re-read when its file changes."""
    path = fits.path(data_dir, ANALYSIS, derived.ALL_ACCOUNTS, model)
    try:
        stamp = path.stat().st_mtime
    except FileNotFoundError:
        return None
    key = (str(path), model)
    if key not in _LOADED or _LOADED[key][0] != stamp:
        found = fits.load(data_dir, ANALYSIS, derived.ALL_ACCOUNTS, model)
        _LOADED[key] = stamp, (cutoff(found) if found is not None and found.arrays else None)
    return _LOADED[key][1]


def needs_fit(found: fits.Fit | None, captioner: str, captions: int, growth: float,
              refit: bool) -> str | None:
    """Why the banks must be encoded anew, or None when they are current enough."""
    if refit:
        return "refit asked"
    if found is None:
        return "first fit"
    if found.meta.get("captioner") != captioner:
        return "captioner changed"
    if captions > found.meta["images"] * (1 + growth):
        return f"grew from {found.meta['images']} captions"
    return None
