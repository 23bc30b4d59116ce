"""Settings: configs/default.toml, then a user TOML file, then CLIPGRAM_<SECTION>_<KEY>
environment variables, then command-line flags — each layer overriding the last.

default.toml gives every key, its default and what it does; the records below give each
key's type: a plain type, `Literal` choices, `Auto | T` for keys that also take "auto", and
`Annotated[T, Between(low, high)]` bounds. An unknown key or a value that does not fit is a
ConfigError that names the key. The records are frozen: what a stage was given is what it used.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Union, get_args, get_origin, get_type_hints

from clipgram import storage
from clipgram.errors import ClipgramError

# The settings the package ships: clipgram/configs in an installed wheel; configs/ beside the
# source in a checkout (an editable install maps the package onto pipeline/ there).
_HERE = Path(__file__).resolve().parent
CONFIG_DIR = next(d for d in (_HERE / "configs", _HERE.parent / "configs") if (d / "default.toml").is_file())
DEFAULT_FILE = CONFIG_DIR / "default.toml"
ENV_PREFIX = "CLIPGRAM_"


class ConfigError(ClipgramError, ValueError):
    pass


@dataclass(frozen=True)
class Between:
    """Inclusive bounds of a number; None: unbounded on that side."""

    low: float | None = None
    high: float | None = None


Auto = Literal["auto"]
Count = Annotated[int, Between(1)]
Seconds = Annotated[float, Between(0)]


@dataclass(frozen=True)
class DataSettings:
    dir: str
    cache_dir: str
    storage_options: dict[str, Any]
    retry_s: Seconds


@dataclass(frozen=True)
class ScrapeSettings:
    limit: Annotated[int, Between(0)]
    session_user: str
    session_dir: str
    since: str
    full: bool
    max_wait_s: Seconds


@dataclass(frozen=True)
class DownloadSettings:
    concurrency: Count
    timeout_s: Seconds
    retries: Annotated[int, Between(0)]
    max_image_pixels: Count
    allow_private_network: bool
    videos: bool
    max_bytes: Count
    deadline_s: Seconds
    decode_deadline_s: Seconds


@dataclass(frozen=True)
class ModelSettings:
    clip: str
    captioner: str
    default_clip: str
    default_captioner: str
    device: str
    cache_dir: str
    precision: Literal["auto", "fp32", "fp16", "bf16"]
    compile: bool
    channels_last: bool


@dataclass(frozen=True)
class DecodeSettings:
    workers: Auto | Annotated[int, Between(0)]
    gpu: Auto | bool
    gpu_share: Auto | Annotated[float, Between(0, 1)]
    draft_factor: float

    def __post_init__(self) -> None:
        if self.draft_factor != 0 and self.draft_factor < 1:
            # below 1 the model would see an image decoded smaller than its input, then upscaled
            raise ConfigError(f"decode.draft_factor: expected 0 (off) or at least 1, got {self.draft_factor!r}")


@dataclass(frozen=True)
class EmbedSettings:
    batch_size: Auto | Count
    part_rows: Count
    retry_failed: bool
    with_captions: Auto | bool
    with_ocr: Auto | bool


@dataclass(frozen=True)
class CaptionSettings:
    batch_size: Auto | Count
    # open_clip's generate() needs more tokens than its minimum caption length (5), and a beam
    # search at least 2 beams
    max_length: Annotated[int, Between(6, 77)]
    generation: Literal["beam_search", "top_p", "top_k"]
    num_beams: Annotated[int, Between(2)]
    beam_groups: Count
    top_p: Annotated[float, Between(1e-6, 1.0)]
    top_k: Count
    temperature: Annotated[float, Between(1e-6)]
    decoder: Literal["cached", "open_clip"]
    retry_failed: bool
    part_rows: Count

    def __post_init__(self) -> None:
        if self.num_beams % self.beam_groups:
            raise ConfigError(f"caption.beam_groups ({self.beam_groups}) must divide "
                              f"caption.num_beams ({self.num_beams})")


@dataclass(frozen=True)
class OcrSettings:
    enabled: bool
    engine: Literal["rapidocr"]
    batch_size: Count
    max_side: Annotated[int, Between(64)]
    min_confidence: Annotated[float, Between(0, 1)]
    threads: Annotated[int, Between(0)]
    retry_failed: bool
    part_rows: Count


@dataclass(frozen=True)
class SearchSettings:
    k: Count
    ann_threshold: Count


@dataclass(frozen=True)
class OrchestrationSettings:
    lock_wait_s: Seconds
    network_retries: Annotated[int, Between(0)]
    retry_delay_s: Seconds
    retry_jitter: Annotated[float, Between(0, 1)]
    ledger_max_parts: Count
    task_runner: Literal["default", "dask"]
    dask_address: str
    dask_workers: Count
    dask_processes: bool
    dask_gpu_resource: str
    dask_shard_images: Annotated[int, Between(0)]


@dataclass(frozen=True)
class AnalysisSettings:
    duplicate_threshold: Annotated[float, Between(-1, 1)]
    k_max: Annotated[int, Between(2)]
    map_method: Literal["auto", "umap", "pca"]
    refit_growth: Annotated[float, Between(0)]


@dataclass(frozen=True)
class Config:
    """Sections as attributes: `cfg.download.concurrency`."""

    data: DataSettings
    scrape: ScrapeSettings
    download: DownloadSettings
    models: ModelSettings
    decode: DecodeSettings
    embed: EmbedSettings
    caption: CaptionSettings
    ocr: OcrSettings
    search: SearchSettings
    orchestration: OrchestrationSettings
    analysis: AnalysisSettings

    @property
    def data_dir(self) -> Path:
        """Where stages read and write: data.dir, or the local mirror of an object-store data.dir."""
        return storage.local_dir(self.data.dir, self.data.cache_dir, self.data.storage_options, self.data.retry_s)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """Plain values, as Prefect parameters and fingerprints take them."""
        return dataclasses.asdict(self)

    def replace(self, section: str, **values: Any) -> Config:
        """A copy with some keys of one section changed, checked like any other layer."""
        return load_config(overrides={**self.as_dict(), section: values}, environ={})


SECTIONS: dict[str, type] = get_type_hints(Config)
_HINTS: dict[str, dict[str, Any]] = {
    name: get_type_hints(record, include_extras=True) for name, record in SECTIONS.items()}


def _convert(key: str, value: Any, kind: type) -> Any:
    """`value` as `kind`, converting the strings environment variables give; else ConfigError."""
    if isinstance(value, str) and kind is not str:
        try:
            if kind is dict:  # an environment variable holding a JSON object
                value = json.loads(value)
                if not isinstance(value, dict):
                    raise ValueError(value)
                return value
            if kind is bool:
                lowered = value.strip().lower()
                if lowered not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                return lowered in ("1", "true", "yes")
            return kind(value)
        except ValueError:  # json.JSONDecodeError included
            raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _fit(key: str, value: Any, hint: Any, auto: bool = False) -> Any:
    """`value` checked against the type `hint` names (see the module's docstring)."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):  # Auto | T
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        return _fit(key, value, next(a for a in get_args(hint) if a != Auto), auto=True)
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
        return value
    if origin is Annotated:
        kind, bounds = get_args(hint)
        value = _fit(key, value, kind)
        low, high = bounds.low, bounds.high
        if (low is not None and value < low) or (high is not None and value > high):
            what = "a count" if kind is int and low == 1 and high is None else \
                f"a value from {low} to {'any' if high is None else high}"
            either = '"auto" or ' if auto else ""
            raise ConfigError(f"{key}: expected {either}{what}, got {value!r}")
        return value
    return _convert(key, value, origin or hint)


def _merge(base: dict[str, dict[str, Any]], layer: Mapping[str, Any], origin: str) -> None:
    for section, values in layer.items():
        if section not in _HINTS:
            raise ConfigError(f"unknown section [{section}] in {origin}; known: {', '.join(_HINTS)}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"[{section}] in {origin} must be a table")
        for key, value in values.items():
            if key not in _HINTS[section]:
                raise ConfigError(
                    f"unknown key {section}.{key} in {origin}; known: {', '.join(_HINTS[section])}"
                )
            base[section][key] = _fit(f"{section}.{key}", value, _HINTS[section][key])


def _env_layer(environ: Mapping[str, str]) -> dict[str, dict]:
    layer: dict[str, dict[str, str]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):].lower()
        section = next((s for s in SECTIONS if rest.startswith(s + "_")), None)
        if section is None:
            continue  # not a settings variable (e.g. CLIPGRAM_TEST_MODEL_CACHE)
        layer.setdefault(section, {})[rest[len(section) + 1:]] = value
    return layer


@cache
def _defaults() -> dict[str, dict[str, Any]]:
    """default.toml, checked against the records: a key missing on either side is a bug here."""
    with open(DEFAULT_FILE, "rb") as f:
        shipped = tomllib.load(f)
    for section, hints in _HINTS.items():
        if set(shipped.get(section, {})) != set(hints):
            raise AssertionError(f"{DEFAULT_FILE} [{section}] and config.{SECTIONS[section].__name__} "
                                 "name different keys")
    base: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    _merge(base, shipped, str(DEFAULT_FILE))
    return base


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the settings: defaults < file at `path` < environment < `overrides`."""
    merged = {section: dict(values) for section, values in _defaults().items()}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        with open(path, "rb") as f:
            try:
                _merge(merged, tomllib.load(f), str(path))
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{path}: {e}") from None
    _merge(merged, _env_layer(os.environ if environ is None else environ), "environment")
    if overrides:
        _merge(merged, {s: {k: v for k, v in kv.items() if v is not None}
                        for s, kv in overrides.items()}, "command line")
    return Config(**{name: record(**merged[name]) for name, record in SECTIONS.items()})


def defaults() -> Config:
    """The shipped settings alone, no environment: what tests and benchmarks start from."""
    return load_config(environ={})
