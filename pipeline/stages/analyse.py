"""Analyse stage: the derived tables (zero-shot labels, clusters, the map, duplicates) brought up to
date after publish, over the whole library and, when it holds several accounts, the account's.

Incremental: an image new to an analysis is scored with the stored label vectors, put in the
nearest stored cluster, placed on the stored map and compared with every image for
near-duplicates, from the published vector index; nothing is encoded. An analysis is fitted
anew when it has no fit, its settings changed, images left the scope, the scope has grown by
`[analysis] refit_growth` since the fit, or on `refit`. Only a label set whose prompts are new
or changed loads the CLIP model (its prompts are encoded).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipgram import catalog
from clipgram.analysis import clusters, derived, duplicates, fits, labels, projection, relevance
from clipgram.config import AnalysisSettings, Config
from clipgram.result import StageResult

log = logging.getLogger("clipgram")


@dataclass(frozen=True)
class Analysis:
    name: str
    settings: Callable[[AnalysisSettings], dict]   # what its fit depends on besides the images
    fit: Callable[[Path, str, str | None, AnalysisSettings, dict], StageResult]
    extend: Callable[[Path, str, str, derived.Vectors, list[int], fits.Fit], int]


ANALYSES = (
    Analysis("clusters", lambda s: {"k_max": s.k_max},
             lambda d, model, account, s, c: clusters.run(d, model, account, None, s.k_max, c), clusters.extend),
    Analysis("map", lambda s: {"map_method": s.map_method},
             lambda d, model, account, s, c: projection.fit(d, model, account, s.map_method, c),
             projection.extend),
    Analysis("duplicates", lambda s: {"threshold": s.duplicate_threshold},
             lambda d, model, account, s, c: duplicates.run(d, model, account, s.duplicate_threshold, c),
             duplicates.extend),
)
MIN_IMAGES = 3  # clustering needs 3


def _needs_fit(fit: fits.Fit | None, wanted: dict, images: int, growth: float, refit: bool) -> str | None:
    """Why the analysis must be fitted anew, or None when new images can be placed on its fit."""
    if refit:
        return "refit asked"
    if fit is None:
        return "first fit"
    # a fit of `clipgram clusters`/`map`/`duplicates` records no config: its settings were asked for
    if fit.meta.get("config", wanted) != wanted:
        return "settings changed"
    if images > fit.meta["images"] * (1 + growth):
        return f"grew from {fit.meta['images']} images"
    return None


def _scope(data_dir: Path, model: str, account: str | None, found: derived.Vectors,
           settings: AnalysisSettings, refit: bool) -> tuple[list[str], int]:
    """Bring the clusters, map and duplicates of one scope up to date: (what was done, how many
    images were placed or fitted)."""
    scope = account or derived.ALL_ACCOUNTS
    known = derived.delta(data_dir, derived.CLUSTERS, scope, model, found)
    gone, new = (known.gone, known.new) if known else (False, [])
    said, touched = [], 0
    for analysis in ANALYSES:
        fit = fits.load(data_dir, analysis.name, scope, model)
        wanted = analysis.settings(settings)
        why = "images removed" if gone else _needs_fit(fit, wanted, len(found.shas), settings.refit_growth, refit)
        if why is None and fit is not None and known is not None and new:
            placed = analysis.extend(data_dir, model, scope, found, new, fit)
            if placed:
                said.append(f"{analysis.name} +{placed}")
                touched = max(touched, placed)
                continue
            why = "cannot place new images on its fit"
        if why is None:
            continue
        result = analysis.fit(data_dir, model, account, settings, wanted)
        said.append(f"{analysis.name} fitted ({why}: {result.note.split(';')[0]})")
        touched = len(found.shas)
    return ([f"{derived.scope_label(scope)}: {', '.join(said)}"] if said else []), touched


def _has_derived(data_dir: Path) -> set[str]:
    return {t.name for t in derived.ALL_DERIVED if any((data_dir / "tables" / t.name).glob("*/*.parquet"))}


def analyse(cfg: Config, account: str | None, refit: bool = False) -> StageResult:
    """Bring the derived tables up to date with the published catalog (see the module doc), over
    the whole library and, when it holds other accounts too, over `account`."""
    from clipgram.stages import publish

    data_dir, settings = cfg.data_dir, cfg.analysis
    scope_name = account or derived.scope_label(derived.ALL_ACCOUNTS)
    with catalog.connect(data_dir) as con:
        model = catalog.meta(con).get("clip_model")
        # the search documents: a table of the catalog, where `images` is a view over Parquet
        accounts = [a for a, in con.execute("SELECT DISTINCT account FROM documents ORDER BY 1").fetchall()]
    if not model:
        return StageResult("analyse", scope_name, note="no embeddings to analyse").log()
    before = _has_derived(data_dir)
    library = derived.vectors(data_dir, model)
    if len(library.shas) < MIN_IMAGES:
        return StageResult("analyse", scope_name, note=f"{len(library.shas)} embedded image(s): "
                                                    f"analyses need {MIN_IMAGES} or more").log()
    encoder = functools.cache(lambda: _text_encoder(cfg, model))  # loaded when a fit needs it
    notes, touched = _labels(cfg, model, library, refit, encoder)
    notes += _relevance(cfg, model, refit, encoder)
    scopes = [(None, library)]
    if len(accounts) > 1 and account in accounts:  # one account: its scope is the library's
        scopes.append((account, derived.vectors(data_dir, model, account)))
    for scope, found in scopes:
        if len(found.shas) >= MIN_IMAGES:
            said, count = _scope(data_dir, model, scope, found, settings, refit)
            notes, touched = notes + said, max(touched, count)
    if _has_derived(data_dir) - before:  # a derived table's view exists once it has a file
        publish.republish(data_dir, scope_name, quiet=True)
        notes.append("catalog published with their views")
    return StageResult("analyse", scope_name, done=touched,
                       note="; ".join(notes) or "up to date").log()


def _text_encoder(cfg: Config, model: str) -> Any:
    """A text encoder of the catalog's model: its saved text tower (fast), else the configured
    model when it is the catalog's; None (with a warning) when neither is at hand."""
    from clipgram.models import clip, model_cache_dir, query_encoder

    saved = query_encoder.load(model_cache_dir(cfg.models.cache_dir), model)
    if saved is not None:
        return saved
    encoder = clip.from_config(cfg.models)
    if encoder.id == model:
        return encoder
    log.warning("label sets and the relevance cutoff not fitted: the catalog's embeddings are from %s, "
                "the configured CLIP model is %s", model, encoder.id)
    return None


def _labels(cfg: Config, model: str, library: derived.Vectors, refit: bool,
            encoder: Callable[[], Any]) -> tuple[list[str], int]:
    """Score the sets whose fit is missing or stale with the CLIP model, then every new image:
    (what was done, how many images were scored)."""
    stale = sorted(labels.load_sets(cfg.data_dir)) if refit else labels.stale(cfg.data_dir, model)
    notes, touched = [], 0
    if stale and encoder() is not None:
        labels.run(cfg.data_dir, encoder(), stale)
        notes.append(f"labels fitted ({', '.join(stale)})")
        touched = len(library.shas)
    placed = labels.extend(cfg.data_dir, model, library)
    if placed:
        notes.append(f"labels +{placed}")
    return notes, max(touched, placed)


def _relevance(cfg: Config, model: str, refit: bool, encoder: Callable[[], Any]) -> list[str]:
    """Encode the banks of caption beginnings the search's relevance cutoff judges by, when
    there are none or the captions grew by `refit_growth` (relevance.py)."""
    with catalog.connect(cfg.data_dir) as con:
        captioner = catalog.meta(con).get("captioner") or ""
        captions = [c for c, in con.execute(
            "SELECT generated_caption FROM documents WHERE length(generated_caption) > 0").fetchall()]
    if not captions:
        return []
    found = fits.load(cfg.data_dir, relevance.ANALYSIS, derived.ALL_ACCOUNTS, model)
    why = relevance.needs_fit(found, captioner, len(captions), cfg.analysis.refit_growth, refit)
    if why is None or encoder() is None:
        return []
    text = encoder()
    relevance.fit(cfg.data_dir, model, captioner, captions, text.encode_text, text.logit_scale)
    return [f"relevance fitted ({why}: {len(captions)} captions)"]
