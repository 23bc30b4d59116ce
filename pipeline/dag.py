"""The DAG, declared once: the seven stages in order, each a small typed record.

The flow (which tasks retry), the runner (what a stage runs and when it may be
skipped), reruns (which stages come after which), the Dask runner (which tasks
need a GPU) and `clipgram status` (the order of its rows) all read `DAG`. Adding
a stage is one entry here plus its module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clipgram import tables
from clipgram.analysis import derived, fits
from clipgram.config import Config
from clipgram.result import StageResult

# where scrape reads from: (recorded instaloader JSON dir, folder or URL list); both None: Instagram
Origin = tuple[str | None, str | None]


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Config, str, Origin], StageResult]
    network: bool = False   # talks to the network: its task retries transient errors
    gpu: bool = False       # loads a model onto the device: one GPU unit on Dask
    # what it reads and writes (globs under tables/, for an account), and the settings sections
    # its output depends on: together, the fingerprint that lets an unchanged stage be skipped.
    # No tables: it always runs (scrape reads Instagram, which has no fingerprint).
    tables: Callable[[str], list[str]] | None = None
    settings: tuple[str, ...] = ()
    # what else its output depends on: clipgram's own code (the catalog's views and macros), files
    # beside the settings (label sets): a change runs the stage again though no table or setting did
    depends: Callable[[Config], object] | None = None


def _catalog_layout(cfg: Config) -> str:
    from clipgram import catalog

    return catalog.layout()


def _label_sets(cfg: Config) -> object:
    from clipgram.analysis import labels

    return {name: labels.definition(s) for name, s in labels.load_sets(cfg.data_dir).items()}


# Each stage's module is imported when the stage runs: they bring torch, open_clip, httpx and
# instaloader, which commands that only read the DAG (`clipgram status`, `sql`) never need.
def _scrape(cfg: Config, account: str, origin: Origin) -> StageResult:
    from clipgram.stages import scrape

    recorded, source = origin
    return scrape.collect(cfg, account, Path(recorded) if recorded else None,
                          Path(source) if source else None)


def _download(cfg: Config, account: str, origin: Origin) -> StageResult:
    from clipgram.stages import download

    return download.download(cfg.data_dir, account, cfg.download)


def _embed(cfg: Config, account: str, origin: Origin) -> StageResult:
    from clipgram.stages import embed

    return embed.run(cfg, account)


def _caption(cfg: Config, account: str, origin: Origin) -> StageResult:
    from clipgram.stages import caption

    return caption.run(cfg, account)


def _ocr(cfg: Config, account: str, origin: Origin) -> StageResult:
    from clipgram.stages import ocr

    return ocr.run(cfg, account)


def _publish(cfg: Config, account: str, origin: Origin) -> StageResult:
    from clipgram.models import captioner, clip
    from clipgram.models import ocr as ocr_model
    from clipgram.stages import publish

    encoder = clip.from_config(cfg.models)
    model = captioner.from_config(cfg.models, cfg.caption)
    return publish.publish(cfg.data_dir, encoder.id, encoder.dim, model.id, account,
                           ann_threshold=cfg.search.ann_threshold, ocr_id=ocr_model.published_id(cfg.ocr))


def _analyse(cfg: Config, account: str, origin: Origin) -> StageResult:
    from clipgram.stages import analyse

    return analyse.analyse(cfg, account)


def _media(account: str) -> str:
    return f"{tables.MEDIA.name}/{tables.MEDIA.parts(account)}"


DAG: tuple[Stage, ...] = (
    Stage("scrape", _scrape, network=True),
    Stage("download", _download, network=True, tables=lambda account: [_media(account)]),
    # the model stages include their output tables: deleting parts (or another account adding
    # shared images) makes them look again
    Stage("embed", _embed, gpu=True,
          tables=lambda account: [_media(account), f"{tables.EMBEDDINGS.name}/**/*.parquet"],
          settings=("models", "embed")),
    Stage("caption", _caption, gpu=True,
          tables=lambda account: [_media(account), f"{tables.CAPTIONS.name}/**/*.parquet"],
          settings=("models", "caption")),
    # the text in images: on the CPU (onnxruntime), so no GPU unit on Dask
    Stage("ocr", _ocr,
          tables=lambda account: [_media(account), f"{tables.OCR.name}/**/*.parquet"],
          settings=("ocr",)),
    Stage("publish", _publish,
          tables=lambda account: [f"{t.name}/**/*.parquet" for t in tables.ALL_TABLES
                                  if t is not tables.RUNS],
          settings=("models", "caption", "ocr"), depends=_catalog_layout),
    # reads the published catalog and every table; writes the derived tables and their fits
    Stage("analyse", _analyse,
          tables=lambda account: [f"{t.name}/**/*.parquet" for t in tables.ALL_TABLES if t is not tables.RUNS]
          + [f"{t.name}/**/*.parquet" for t in derived.ALL_DERIVED] + [f"{fits.FITS_DIR}/**/*.parquet"],
          settings=("analysis",), depends=_label_sets),
)
NAMES: tuple[str, ...] = tuple(stage.name for stage in DAG)
_BY_NAME = {stage.name: stage for stage in DAG}


def stage(name: str) -> Stage:
    """The stage called `name`; ValueError naming the stages for an unknown one."""
    return ordered([name])[0]


def ordered(names: list[str]) -> list[Stage]:
    """The stages called `names`, in DAG order; ValueError naming the stages for an unknown one."""
    unknown = [n for n in names if n not in _BY_NAME]
    if unknown:
        raise ValueError(f"unknown stage {', '.join(unknown)}: one of {', '.join(NAMES)}")
    return [s for s in DAG if s.name in names]


def fingerprint(cfg: Config, account: str, stage: Stage) -> Callable[[], str] | None:
    """What `stage` reads and writes for `account`, with its settings; None: always run."""
    if stage.tables is None:
        return None
    globs = stage.tables(account)
    settings = [dataclasses.asdict(getattr(cfg, section)) for section in stage.settings]
    depends = stage.depends
    return lambda: tables.fingerprint(cfg.data_dir, globs, *settings, *([depends(cfg)] if depends else []))
