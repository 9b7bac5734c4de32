"""Study configs: parsing the TOML, the shipped presets, and each variant's architecture.

A study config holds ``[study]`` (name, description, question, baseline, seeds, data_seed,
match_params_by), ``[model]`` and ``[train]`` (the base run, as in ``nnobs train``),
``[observe]`` (:class:`~nnobs.observe.trajectory.TrajectorySettings` fields) and ``[[variants]]``
(name, description, ``model = {knob = value}`` overrides, optional ``match_params_by``).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nnobs.core.errors import NnobsError
from nnobs.models.config import ModelConfig
from nnobs.models.sizing import count_params, match_params
from nnobs.observe.trajectory import TrajectorySettings
from nnobs.training.config import TrainConfig

STUDY_DIR = Path(__file__).parent / "studies"
MATCH_KNOBS = ("d_mlp", "d_model", "none")
SECTIONS = ("study", "model", "train", "observe", "variants")


@dataclass
class Variant:
    name: str
    model: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    match_params_by: str | None = None  # None: the study's setting


@dataclass
class StudyConfig:
    """A resolved study: the base run, the variants and how they are compared."""

    name: str
    model: ModelConfig
    train: TrainConfig
    observe: TrajectorySettings
    variants: list[Variant]
    baseline: str
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    data_seed: int = 0
    match_params_by: str = "d_mlp"
    description: str = ""
    question: str = ""

    def __post_init__(self) -> None:
        names = [v.name for v in self.variants]
        if len(names) < 2:
            raise NnobsError("a study needs at least two [[variants]] to compare")
        if len(set(names)) != len(names):
            raise NnobsError(f"variant names must be unique, got {names}")
        bad = [n for n in names if not n or "/" in n or n.startswith(".")]
        if bad:
            raise NnobsError(f"variant names are directory names: {bad} will not do")
        if self.baseline not in names:
            raise NnobsError(f"baseline {self.baseline!r} is not a variant: choose one of {names}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise NnobsError(f"seeds must be distinct integers, got {self.seeds}")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise NnobsError(f"seeds must be integers >= 0, got {self.seeds}")
        for knob in [self.match_params_by, *(v.match_params_by for v in self.variants)]:
            if knob is not None and knob not in MATCH_KNOBS:
                raise NnobsError(
                    f"match_params_by {knob!r}: choose one of {', '.join(MATCH_KNOBS)}"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "question": self.question,
            "baseline": self.baseline,
            "seeds": list(self.seeds),
            "data_seed": self.data_seed,
            "match_params_by": self.match_params_by,
            "model": self.model.to_dict(),
            "train": self.train.to_dict(),
            "observe": asdict(self.observe),
            "variants": [asdict(v) for v in self.variants],
        }


def study_run_dir(out: Path, variant: str, seed: int) -> Path:
    """The run directory of ``variant`` at training ``seed`` in the study directory ``out``."""
    return out / "runs" / variant / f"seed_{seed}"


def study_preset_names() -> list[str]:
    return sorted(p.stem for p in STUDY_DIR.glob("*.toml"))


def study_preset_path(name: str) -> Path:
    path = STUDY_DIR / f"{name}.toml"
    if not path.is_file():
        raise NnobsError(
            f"unknown study preset {name!r}: choose one of {', '.join(study_preset_names())}"
        )
    return path


def parse_study(tables: dict[str, Any], source: str = "study config") -> StudyConfig:
    """Build a :class:`StudyConfig` from parsed TOML tables; every mistake is one NnobsError."""
    unknown = sorted(set(tables) - set(SECTIONS))
    if unknown:
        raise NnobsError(
            f"{source} has unexpected top-level entries {unknown}: a study holds "
            "[study], [model], [train], [observe] and [[variants]]"
        )
    study = dict(tables.get("study", {}))
    raw_variants = tables.get("variants")
    if not isinstance(raw_variants, list) or not raw_variants:
        raise NnobsError(f"{source} has no [[variants]]: add at least two")
    variants = []
    for i, raw in enumerate(raw_variants):
        if not isinstance(raw, dict) or "name" not in raw:
            raise NnobsError(f"variant {i} in {source} has no name")
        extra = sorted(set(raw) - {f.name for f in dataclasses.fields(Variant)})
        if extra:
            raise NnobsError(
                f"variant {raw['name']!r} has unknown entries {extra}: a variant has name, "
                "description, model (a table of model knobs) and match_params_by"
            )
        variants.append(Variant(**raw))
    known = {f.name for f in dataclasses.fields(StudyConfig)} - {
        "model",
        "train",
        "observe",
        "variants",
    }
    extra = sorted(set(study) - known)
    if extra:
        raise NnobsError(
            f"[study] in {source} has unknown entries {extra}: known are {sorted(known)}"
        )
    try:
        model = ModelConfig.from_dict(dict(tables.get("model", {})))
        train = TrainConfig.from_dict(dict(tables.get("train", {})))
        observe = TrajectorySettings.from_dict(dict(tables.get("observe", {})))
        for v in variants:  # every variant must be a valid architecture on its own
            model.replace(**v.model)
        return StudyConfig(
            model=model,
            train=train,
            observe=observe,
            variants=variants,
            name=study.pop("name", source),
            baseline=study.pop("baseline", variants[0].name),
            **study,
        )
    except TypeError as e:
        raise NnobsError(f"invalid value in {source}: {e}") from e


def load_study_config(
    preset: str | None = None, config: str | os.PathLike | None = None
) -> StudyConfig:
    """A study from a shipped preset or a TOML file."""
    if preset is not None and config is not None:
        raise NnobsError("give a study preset or a config file, not both")
    path = Path(config) if config is not None else study_preset_path(preset or "quick")
    try:
        tables = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise NnobsError(f"study config {str(path)!r} does not exist") from e
    except (OSError, UnicodeDecodeError) as e:
        raise NnobsError(f"study config {str(path)!r} cannot be read ({e})") from e
    except tomllib.TOMLDecodeError as e:
        raise NnobsError(f"study config {str(path)!r} is not valid TOML: {e}") from e
    tables.setdefault("study", {}).setdefault("name", path.stem)
    return parse_study(tables, str(path))


def variant_configs(cfg: StudyConfig) -> dict[str, ModelConfig]:
    """Each variant's architecture, matched in parameters to the baseline where asked."""
    by_name = {v.name: v for v in cfg.variants}
    baseline = cfg.model.replace(**by_name[cfg.baseline].model)
    target = count_params(baseline)
    out = {}
    for v in cfg.variants:
        config = cfg.model.replace(**v.model)
        knob = v.match_params_by or cfg.match_params_by
        if v.name != cfg.baseline and knob != "none" and count_params(config) != target:
            config = match_params(config, target, knob=knob)
        out[v.name] = config
    return out
