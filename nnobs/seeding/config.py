"""The persistence experiment's settings: a TOML file (or a shipped preset) with a
``[seeding]`` table and the small and large models' run configs, ``[small.model]``,
``[small.train]``, ``[large.model]``, ``[large.train]``.

Every run of the experiment sees the same data order (``data_seed``); training seed ``s``
initialises small run ``s``, the new units of the large runs grown from it, and the random-init
large run ``s``, so the conditions are paired seed by seed.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnobs.core.errors import NnobsError
from nnobs.core.fields import check_choice, check_int, check_number, from_fields
from nnobs.data.python_labels import ATTRIBUTES
from nnobs.models.config import ModelConfig
from nnobs.seeding.grow import GrowthPlan
from nnobs.training.config import MAX_SEED, TrainConfig
from nnobs.training.runconfig import build_configs, parse_override

PRESET_DIR = Path(__file__).parent / "presets"
MIN_SEEDS = 5  # fewer seeds make the bootstrap intervals undercover (see seeding.analysis)
NUMERIC_ATTRIBUTES = ("bracket_depth", "indent_level")  # probed by ridge R², others accuracy


@dataclass
class SeedingSettings:
    """The ``[seeding]`` table: seeds, auxiliary task, probes and analysis."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    data_seed: int = 0
    attribute: str = "bracket_depth"
    aux_layer: int = 1
    aux_weight: float = 1.0
    layer_map: list[int] | None = None
    probe_tokens: int = 3000
    probe_alpha: float = 1.0
    n_boot: int = 2000
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if not isinstance(self.seeds, list) or len(set(map(str, self.seeds))) < MIN_SEEDS:
            raise NnobsError(
                f"seeding.seeds must list at least {MIN_SEEDS} distinct training seeds, got "
                f"{self.seeds!r}: intervals over fewer seeds undercover"
            )
        for s in (*self.seeds, self.data_seed):
            check_int("seeding seed", s, 0, MAX_SEED)
        check_choice("seeding.attribute", self.attribute, ATTRIBUTES)
        check_int("seeding.aux_layer", self.aux_layer, 0)
        check_number("seeding.aux_weight", self.aux_weight, 0, open_low=True)
        check_int("seeding.probe_tokens", self.probe_tokens, 100)
        check_number("seeding.probe_alpha", self.probe_alpha, 0, open_low=True)
        check_int("seeding.n_boot", self.n_boot, 100)
        check_number("seeding.confidence", self.confidence, 0, 1, open_low=True, open_high=True)

    @property
    def metric(self) -> str:
        return "r2" if self.attribute in NUMERIC_ATTRIBUTES else "accuracy"


@dataclass
class SeedingConfig:
    """Everything the experiment runs: settings plus the small and large run configs."""

    settings: SeedingSettings
    small: tuple[ModelConfig, TrainConfig]
    large: tuple[ModelConfig, TrainConfig]

    def run_configs(self, size: str, seed: int) -> tuple[ModelConfig, TrainConfig]:
        """The run config of training seed ``seed`` (data order shared by all runs)."""
        mc, tc = self.small if size == "small" else self.large
        return mc, tc.replace(seed=seed, data_seed=self.settings.data_seed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seeding": {**self.settings.__dict__, "metric": self.settings.metric},
            **{
                size: {"model": mc.to_dict(), "train": tc.to_dict()}
                for size, (mc, tc) in (("small", self.small), ("large", self.large))
            },
        }


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_seeding_config(
    preset: str | None = None,
    path: str | os.PathLike | None = None,
    overrides: list[str] = (),
) -> SeedingConfig:
    """The experiment of a preset (default ``default``) or a TOML file, with overrides
    ``seeding.KEY=V``, ``small.model.KEY=V``, ``large.train.KEY=V`` … applied."""
    if preset is not None and path is not None:
        raise NnobsError("give a preset or a config file, not both")
    if path is None:
        path = PRESET_DIR / f"{preset or 'default'}.toml"
        if not path.is_file():
            raise NnobsError(
                f"unknown preset {preset!r}: choose one of {', '.join(preset_names())}"
            )
    try:
        tables = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise NnobsError(f"config file {str(path)!r} does not exist") from e
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise NnobsError(f"config file {str(path)!r} cannot be read as TOML ({e})") from e
    unknown = sorted(set(tables) - {"seeding", "small", "large"})
    if unknown:
        raise NnobsError(f"unknown table(s) {', '.join(unknown)}: use seeding, small, large")
    for text in overrides:
        _apply_override(tables, text)
    settings = from_fields(SeedingSettings, tables.get("seeding", {}), "seeding setting")
    small = build_configs(tables.get("small", {}))
    large = build_configs(tables.get("large", {}))
    return _checked(SeedingConfig(settings, small, large))


def _apply_override(tables: dict[str, Any], text: str) -> None:
    """``seeding.n_boot=500`` or ``large.train.steps=300`` into ``tables``."""
    key, sep, value = text.partition("=")
    head, dot, rest = key.strip().partition(".")
    if head == "seeding" and dot:
        _, name, parsed = parse_override(f"train.{rest}={value}")
        tables.setdefault("seeding", {})[name] = parsed
    elif head in ("small", "large") and sep and dot:
        section, name, parsed = parse_override(f"{rest}={value}")
        tables.setdefault(head, {}).setdefault(section, {})[name] = parsed
    else:
        raise NnobsError(
            f"override {text!r} is not seeding.KEY=VALUE or small|large.model|train.KEY=VALUE"
        )


def _checked(config: SeedingConfig) -> SeedingConfig:
    """Refuse an experiment that cannot run, before anything is trained."""
    (smc, stc), (lmc, ltc) = config.small, config.large
    s = config.settings
    GrowthPlan.of(smc, lmc, s.layer_map)  # the large config holds the small model exactly
    if s.aux_layer >= smc.n_layers:
        raise NnobsError(
            f"seeding.aux_layer={s.aux_layer} is out of range: the small model has layers "
            f"0..{smc.n_layers - 1}"
        )
    for knob in ("corpus", "max_chars", "tokenizer"):
        if getattr(stc, knob) != getattr(ltc, knob):
            raise NnobsError(
                f"small.train.{knob} and large.train.{knob} differ ({getattr(stc, knob)!r} vs "
                f"{getattr(ltc, knob)!r}): the conditions must share tokenizer and data"
            )
    return config
