"""Settings: configs/default.toml, then a user TOML file, then CLIPGRAM_<SECTION>_<KEY>
environment variables, then command-line flags — each layer overriding the last.

default.toml is the schema: it names every key and its type, so an unknown key
or a value of the wrong type is an error that names the key.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

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


class Config(SimpleNamespace):
    """Sections as attributes: `cfg.download.concurrency`."""

    @property
    def data_dir(self) -> Path:
        """Where stages read and write: data.dir, or the local mirror of an object-store data.dir."""
        return storage.local_dir(self.data.dir, self.data.cache_dir, self.data.storage_options)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dict(vars(section)) for name, section in vars(self).items()}


# Keys whose default is "auto" and whose other values are not words: the type they take.
AUTO_TYPES: dict[str, type] = {
    "decode.workers": int, "decode.gpu": bool, "decode.gpu_share": float,
    "embed.batch_size": int, "caption.batch_size": int,
}
# Keys that take one of a few words.
CHOICES: dict[str, tuple[str, ...]] = {
    "models.precision": ("auto", "fp32", "fp16", "bf16"),
    "caption.generation": ("beam_search", "top_p", "top_k"),
    "caption.decoder": ("cached", "open_clip"),
    "orchestration.task_runner": ("default", "dask"),
}

# Numbers with bounds: (lowest, highest), inclusive; None: unbounded. open_clip's generate()
# needs more tokens than its minimum caption length (5), and a beam search at least 2 beams.
BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "caption.max_length": (6, 77), "caption.num_beams": (2, None), "caption.beam_groups": (1, None),
    "caption.top_k": (1, None), "caption.top_p": (1e-6, 1.0), "caption.temperature": (1e-6, None),
}


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


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check `value` against the key's type (that of its default, or AUTO_TYPES)."""
    if key in AUTO_TYPES:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        value = _convert(key, value, AUTO_TYPES[key])
        if AUTO_TYPES[key] is int and value < (0 if key == "decode.workers" else 1):
            raise ConfigError(f"{key}: expected \"auto\" or a count, got {value!r}")
        if AUTO_TYPES[key] is float and not 0 <= value <= 1:
            raise ConfigError(f"{key}: expected \"auto\" or a share from 0 to 1, got {value!r}")
        return value
    value = _convert(key, value, type(default))
    if key == "decode.draft_factor" and value != 0 and value < 1:
        # below 1 the model would see an image decoded smaller than its input, then upscaled
        raise ConfigError(f"{key}: expected 0 (off) or at least 1, got {value!r}")
    low, high = BOUNDS.get(key, (None, None))
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"{key}: expected a value from {low} to {high or 'any'}, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{key}: expected one of {', '.join(CHOICES[key])}, got {value!r}")
    return value


def _merge(base: dict[str, dict[str, Any]], layer: Mapping[str, Any], origin: str) -> None:
    for section, values in layer.items():
        if section not in base:
            raise ConfigError(f"unknown section [{section}] in {origin}; known: {', '.join(base)}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"[{section}] in {origin} must be a table")
        for key, value in values.items():
            if key not in base[section]:
                raise ConfigError(
                    f"unknown key {section}.{key} in {origin}; known: {', '.join(base[section])}"
                )
            base[section][key] = _coerce(f"{section}.{key}", value, base[section][key])


def _env_layer(base: dict[str, dict[str, Any]], environ: Mapping[str, str]) -> dict[str, dict]:
    layer: dict[str, dict[str, str]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):].lower()
        section = next((s for s in base if rest.startswith(s + "_")), None)
        if section is None:
            continue  # not a settings variable (e.g. CLIPGRAM_TEST_MODEL_CACHE)
        layer.setdefault(section, {})[rest[len(section) + 1:]] = value
    return layer


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the settings: defaults < file at `path` < environment < `overrides`."""
    with open(DEFAULT_FILE, "rb") as f:
        merged: dict[str, dict[str, Any]] = tomllib.load(f)
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        with open(path, "rb") as f:
            try:
                _merge(merged, tomllib.load(f), str(path))
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{path}: {e}") from None
    env = os.environ if environ is None else environ
    _merge(merged, _env_layer(merged, env), "environment")
    if overrides:
        _merge(merged, {s: {k: v for k, v in kv.items() if v is not None}
                        for s, kv in overrides.items()}, "command line")
    caption = merged["caption"]
    if caption["num_beams"] % caption["beam_groups"]:
        raise ConfigError(f"caption.beam_groups ({caption['beam_groups']}) must divide "
                          f"caption.num_beams ({caption['num_beams']})")
    return Config(**{name: SimpleNamespace(**values) for name, values in merged.items()})
