"""Zero-shot labels: score every stored image embedding against sets of text prompts.

A label's vector is the normalised mean of the CLIP text embeddings of all its
prompts × the set's templates (prompt ensembling, as in the CLIP paper). An
image's score for a label is the softmax, over the set's labels, of cosine ×
CLIP's logit scale: the probability the model gives that label among the set.
"""

from __future__ import annotations

import json
import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipgram import storage, tables
from clipgram.analysis import derived, fits
from clipgram.config import CONFIG_DIR
from clipgram.errors import ClipgramError
from clipgram.result import StageResult

log = logging.getLogger("clipgram")

CONFIG_FILE = CONFIG_DIR / "labels.toml"
USER_FILE = "labels.toml"   # in the data directory: sets from `clipgram labels define`


class LabelError(ClipgramError, ValueError):
    pass


@dataclass(frozen=True)
class LabelSet:
    name: str
    labels: dict[str, list[str]]     # label → prompts
    templates: list[str]

    def prompts(self, label: str) -> list[str]:
        return [t.replace("{}", p) for p in self.labels[label] for t in self.templates]


def _parse(doc: dict[str, Any], origin: str) -> dict[str, LabelSet]:
    default_templates = doc.get("templates", {}).get("default", ["{}"])
    sets = {}
    for name, body in doc.items():
        if name == "templates":
            continue
        labels = body.get("labels") if isinstance(body, dict) else None
        if not isinstance(labels, dict) or len(labels) < 2:
            raise LabelError(f"[{name}] in {origin}: needs a [{name}.labels] table with two labels or more")
        sets[name] = LabelSet(
            tables.check_partition_value(name),
            {label: [prompts] if isinstance(prompts, str) else list(prompts)
             for label, prompts in labels.items()},
            list(body.get("templates", default_templates)))
    return sets


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise LabelError(f"{path}: {e}") from None


def load_sets(data_dir: Path) -> dict[str, LabelSet]:
    """configs/labels.toml, overridden set by set by the data directory's labels.toml."""
    base = _read(CONFIG_FILE)
    user = _read(data_dir / USER_FILE)
    user.setdefault("templates", base.get("templates", {}))
    return {**_parse(base, str(CONFIG_FILE)), **_parse(user, str(data_dir / USER_FILE))}


def define(data_dir: Path, name: str, labels: dict[str, list[str]], templates: list[str] | None) -> Path:
    """Add or replace label set `name` in the data directory's labels.toml."""
    tables.check_partition_value(name)
    if len(labels) < 2:
        raise LabelError("a label set needs two labels or more: LABEL=PROMPT LABEL=PROMPT …")
    doc = _read(data_dir / USER_FILE)
    doc[name] = {"labels": labels, **({"templates": templates} if templates else {})}
    lines = []
    for set_name, body in doc.items():  # TOML strings accept JSON's escapes
        if set_name == "templates":
            lines += ["[templates]", *(f"{k} = {json.dumps(v)}" for k, v in body.items()), ""]
            continue
        lines.append(f"[{set_name}]")
        if "templates" in body:
            lines.append(f"templates = {json.dumps(body['templates'])}")
        lines.append(f"[{set_name}.labels]")
        lines += [f"{json.dumps(label)} = {json.dumps(prompts)}" for label, prompts in body["labels"].items()]
        lines.append("")
    path = data_dir / USER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_text(path, "\n".join(lines))
    return path


def label_vectors(encoder: Any, label_set: LabelSet) -> np.ndarray:
    """(labels, d) unit vectors: each label's prompt × template embeddings, averaged."""
    vectors = []
    for label in label_set.labels:
        mean = encoder.encode_text(label_set.prompts(label)).mean(axis=0)
        vectors.append(mean / np.linalg.norm(mean))
    return np.stack(vectors).astype(np.float32)


def score(vectors: np.ndarray, label_vecs: np.ndarray, logit_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(cosines, softmax probabilities), both (images, labels)."""
    cosines = vectors @ label_vecs.T
    logits = cosines * logit_scale
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return cosines, probs / probs.sum(axis=1, keepdims=True)


def definition(label_set: LabelSet) -> dict[str, Any]:
    """What a set's label vectors are computed from: a stored fit of another definition is stale."""
    return {"labels": label_set.labels, "templates": label_set.templates}


def _rows(shas: list[str], vectors: np.ndarray, label_vecs: np.ndarray, labels: list[str],
          scale: float) -> list[dict[str, Any]]:
    if not shas:
        return []
    cosines, probs = score(vectors, label_vecs, scale)
    ranks = (-probs).argsort(axis=1).argsort(axis=1) + 1
    return [{"sha256": sha, "label": labels[j], "score": float(probs[i, j]),
             "cosine": float(cosines[i, j]), "rank": int(ranks[i, j])}
            for i, sha in enumerate(shas) for j in range(len(labels))]


def run(data_dir: Path, encoder: Any, names: list[str] | None = None) -> list[StageResult]:
    """Score every stored embedding of the encoder's model against each label set (all by default)."""
    sets = load_sets(data_dir)
    unknown = sorted(set(names or []) - set(sets))
    if unknown:
        raise LabelError(f"unknown label set(s) {', '.join(unknown)}; known: {', '.join(sorted(sets))} "
                         f"(add one with `clipgram labels define`)")
    found = derived.vectors(data_dir, encoder.id)
    vectors = found.of()
    # the temperature CLIP was trained with; 100 is its usual learned value
    scale = encoder.logit_scale
    results = []
    for name in names or sorted(sets):
        label_set = sets[name]
        label_vecs = label_vectors(encoder, label_set)
        derived.replace(data_dir, derived.LABELS, name, encoder.id,
                        _rows(found.shas, vectors, label_vecs, list(label_set.labels), scale))
        fits.save(data_dir, "labels", name, encoder.id, fits.Fit(
            {"images": len(found.shas), "scale": scale, "definition": definition(label_set)},
            {"vectors": label_vecs}))
        results.append(StageResult("labels", name, done=len(found.shas), note=f"{len(label_set.labels)} labels"))
    return results


def stale(data_dir: Path, model: str) -> list[str]:
    """The configured sets whose result or stored fit is missing, or whose fit is of another
    definition: scoring them needs the CLIP model (their prompts are encoded)."""
    sets = load_sets(data_dir)
    return [name for name, label_set in sorted(sets.items())
            if (fit := fits.load(data_dir, "labels", name, model)) is None
            or fit.meta["definition"] != definition(label_set)
            or not derived.LABELS.file(data_dir, name, model).exists()]


def extend(data_dir: Path, model: str, found: derived.Vectors) -> int:
    """Score the images of `found` that a set has not scored yet, for every set with a current
    fit, with its stored label vectors: no model is loaded. Returns how many images were new."""
    placed = 0
    for name in load_sets(data_dir):
        fit = fits.load(data_dir, "labels", name, model)
        known = derived.delta(data_dir, derived.LABELS, name, model, found)
        if fit is None or known is None:
            continue
        new = known.new
        if new:
            derived.append(data_dir, derived.LABELS, name, model, _rows(
                [found.shas[i] for i in new], found.of(new), fit.arrays["vectors"],
                list(fit.meta["definition"]["labels"]), fit.meta["scale"]))
        placed = max(placed, len(new))
    return placed
