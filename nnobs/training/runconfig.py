"""Run configurations as TOML: a ``[model]`` table of ModelConfig knobs and a ``[train]``
table of TrainConfig settings, from a shipped preset or a file, with command-line overrides.

An override is ``section.key=value`` with the value read as a TOML literal (``256``,
``"relu"``, ``[512, 64, 512]``, ``true``); a value that is not valid TOML is taken as a plain
string, so ``train.corpus=/data/code`` needs no quoting.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nnobs.core.errors import NnobsError
from nnobs.models.config import ModelConfig
from nnobs.training.config import TrainConfig

PRESET_DIR = Path(__file__).parent / "presets"
SECTIONS = ("model", "train")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a run config file; a missing, unreadable or invalid file is one NnobsError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise NnobsError(f"config file {str(path)!r} does not exist") from e
    except (OSError, UnicodeDecodeError) as e:
        raise NnobsError(f"config file {str(path)!r} cannot be read ({e})") from e
    try:
        tables = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise NnobsError(f"config file {str(path)!r} is not valid TOML: {e}") from e
    unknown = sorted(set(tables) - set(SECTIONS))
    if unknown or any(not isinstance(tables.get(s, {}), dict) for s in SECTIONS):
        raise NnobsError(
            f"config file {str(path)!r} has unexpected top-level entries "
            f"({', '.join(unknown) or 'model/train not tables'}): a run config holds only "
            "[model] and [train] tables"
        )
    return tables


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.toml"
    if not path.is_file():
        raise NnobsError(f"unknown preset {name!r}: choose one of {', '.join(preset_names())}")
    return path


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"model.d_model=256"`` → ``("model", "d_model", 256)``."""
    key, sep, raw = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or section not in SECTIONS or not name:
        raise NnobsError(
            f"override {text!r} is not section.key=value with section model or train "
            "(e.g. --set model.d_model=256)"
        )
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, name.strip(), value


def build_configs(
    tables: dict[str, Any], overrides: Iterable[str] = ()
) -> tuple[ModelConfig, TrainConfig]:
    tables = {s: dict(tables.get(s, {})) for s in SECTIONS}
    for text in overrides:
        section, name, value = parse_override(text)
        tables[section][name] = value
    try:
        return ModelConfig.from_dict(tables["model"]), TrainConfig.from_dict(tables["train"])
    except TypeError as e:  # a wrongly typed value that the dataclass checks cannot word
        raise NnobsError(f"invalid run config value: {e}") from e


def load_run_config(
    preset: str | None = None,
    config: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
) -> tuple[ModelConfig, TrainConfig]:
    """The (model, train) configs of a preset or a TOML file, overrides applied."""
    if preset is not None and config is not None:
        raise NnobsError("give a preset or a config file, not both")
    path = Path(config) if config is not None else preset_path(preset or "default")
    return build_configs(read_toml(path), overrides)
