"""Frontier configs: the grid of models (total width × nonzero weights), parsed from TOML.

A frontier config holds ``[frontier]`` (name, description, widths, nonzero, dense, seeds,
data_seed, mlp_ratio, tasks, target_loss, pruning and measuring settings), ``[model]`` and
``[train]`` (the base run, as in ``nnobs train``). Each grid point is one architecture and one
kept fraction: ``d_model`` = width, ``d_mlp`` = ``mlp_ratio`` × width, ``n_heads`` = width /
``d_head``; a sparse point keeps ``nonzero`` weights in its matrices, so its kept fraction is
``nonzero`` / (its matrix parameters), and every width at one ``nonzero`` has the same L0
(what the paper's second claim holds fixed); ``dense = true`` adds each width's dense model.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnobs.core.errors import NnobsError
from nnobs.core.fields import check_int, check_number
from nnobs.data.python_tasks import PYTHON_TASKS
from nnobs.models.config import ModelConfig
from nnobs.training.config import TrainConfig

PRESET_DIR = Path(__file__).parent / "presets"
SECTIONS = ("frontier", "model", "train")


@dataclass(frozen=True)
class GridPoint:
    """One model of the grid: its name (a directory name), width and kept fraction;
    ``nonzero`` is the L0 target of its matrices (None for a dense model)."""

    name: str
    width: int
    nonzero: int | None
    keep: float
    model: ModelConfig
    train: TrainConfig


@dataclass
class FrontierConfig:
    """A resolved frontier study (see the module doc)."""

    name: str
    model: ModelConfig
    train: TrainConfig
    widths: list[int]
    nonzero: list[int]
    tasks: list[str]
    dense: bool = True
    seeds: list[int] = field(default_factory=lambda: [0])
    data_seed: int = 0
    mlp_ratio: int = 4
    target_loss: float = 0.15
    n_train: int = 256
    n_heldout: int = 128
    prune_steps: int = 500
    eval_tokens: int = 32768
    n_boot: int = 2000
    level: float = 0.05
    description: str = ""

    def __post_init__(self) -> None:
        for name in ("widths", "nonzero", "seeds", "tasks"):
            values = getattr(self, name)
            if not isinstance(values, list) or len(set(values)) != len(values):
                raise NnobsError(
                    f"frontier.{name} must be a list of distinct values, got {values!r}"
                )
        if not self.tasks:
            raise NnobsError("frontier.tasks is empty: name at least one Python task")
        unknown = [t for t in self.tasks if t not in PYTHON_TASKS]
        if unknown:
            raise NnobsError(
                f"frontier.tasks: unknown Python tasks {unknown}: choose from "
                f"{', '.join(PYTHON_TASKS)}"
            )
        d_head = self.model.d_head or self.model.d_model // self.model.n_heads
        for w in self.widths:
            check_int("frontier.widths entry", w, 1)
            if w % d_head:
                raise NnobsError(f"frontier width {w} is not a multiple of d_head {d_head}")
        for n in self.nonzero:
            check_int("frontier.nonzero entry", n, 1)
        for s in [*self.seeds, self.data_seed]:
            check_int("frontier seed", s, 0)
        for name in ("mlp_ratio", "n_train", "n_heldout", "eval_tokens", "n_boot"):
            check_int(f"frontier.{name}", getattr(self, name), 1)
        check_int("frontier.prune_steps", self.prune_steps, 0)
        check_number("frontier.target_loss", self.target_loss, 0, open_low=True)
        check_number("frontier.level", self.level, 0, 0.5, open_low=True)
        if len(self.points()) < 2:
            raise NnobsError("a frontier needs at least two grid points (widths × nonzero)")

    def points(self) -> list[GridPoint]:
        """Every grid point, widths in order, densest first within a width."""
        out = []
        for width in self.widths:
            model = self.model.replace(
                d_model=width,
                d_mlp=self.mlp_ratio * width,
                n_heads=width // (self.model.d_head or self.model.d_model // self.model.n_heads),
            )
            base = self.train.replace(data_seed=self.data_seed)
            if self.dense:
                out.append(GridPoint(f"w{width}-dense", width, None, 1.0, model, base))
            matrices = matrix_params(model)
            for n in sorted(self.nonzero, reverse=True):
                if n >= matrices:
                    raise NnobsError(
                        f"frontier.nonzero {n} is not below the {matrices} matrix weights of "
                        f"width {width}: lower it or drop the width"
                    )
                keep = n / matrices
                out.append(
                    GridPoint(
                        f"w{width}-nz{n}", width, n, keep, model, base.replace(weight_keep=keep)
                    )
                )
        return out

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["model"], data["train"] = self.model.to_dict(), self.train.to_dict()
        return data


def matrix_params(config: ModelConfig) -> int:
    """The entries of the weight matrices weight sparsity applies to (counted on the meta
    device: no memory used)."""
    import torch

    from nnobs.models.transformer import Transformer
    from nnobs.training.sparsity import sparsified_parameters

    with torch.device("meta"):
        model = Transformer(config)
    return sum(p.numel() for _, p in sparsified_parameters(model, biases=False))


def run_dir(out: Path, point: str, seed: int) -> Path:
    """The run directory of grid point ``point`` at training ``seed`` in frontier ``out``."""
    return out / "runs" / point / f"seed_{seed}"


def measures_dir(out: Path, point: str, seed: int) -> Path:
    """Where a run's loss per document and its circuit sizes are kept."""
    return out / "measures" / point / f"seed_{seed}"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("frontier*.toml"))


def parse_frontier(tables: dict[str, Any], source: str = "frontier config") -> FrontierConfig:
    """A :class:`FrontierConfig` from parsed TOML tables; every mistake is one NnobsError."""
    unknown = sorted(set(tables) - set(SECTIONS))
    if unknown:
        raise NnobsError(
            f"{source} has unexpected top-level entries {unknown}: a frontier holds "
            "[frontier], [model] and [train]"
        )
    frontier = dict(tables.get("frontier", {}))
    known = {f.name for f in dataclasses.fields(FrontierConfig)} - {"model", "train"}
    extra = sorted(set(frontier) - known)
    if extra:
        raise NnobsError(
            f"[frontier] in {source} has unknown entries {extra}: known are {sorted(known)}"
        )
    missing = [name for name in ("widths", "nonzero", "tasks") if name not in frontier]
    if missing:
        raise NnobsError(f"[frontier] in {source} lacks {', '.join(missing)}")
    try:
        model = ModelConfig.from_dict(dict(tables.get("model", {})))
        train = TrainConfig.from_dict(dict(tables.get("train", {})))
        frontier.setdefault("name", source)
        return FrontierConfig(model=model, train=train, **frontier)
    except TypeError as e:
        raise NnobsError(f"invalid value in {source}: {e}") from e


def load_frontier_config(
    preset: str | None = None, config: str | os.PathLike | None = None
) -> FrontierConfig:
    """A frontier from a shipped preset (``cpu``) or a TOML file."""
    if preset is not None and config is not None:
        raise NnobsError("give a frontier preset or a config file, not both")
    if config is not None:
        path = Path(config)
    else:
        path = PRESET_DIR / f"frontier_{preset or 'cpu'}.toml"
        if not path.is_file():
            names = [n.removeprefix("frontier_") for n in preset_names()]
            raise NnobsError(
                f"unknown frontier preset {preset!r}: choose one of {', '.join(names)}"
            )
    try:
        tables = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise NnobsError(f"frontier config {str(path)!r} does not exist") from e
    except (OSError, UnicodeDecodeError) as e:
        raise NnobsError(f"frontier config {str(path)!r} cannot be read ({e})") from e
    except tomllib.TOMLDecodeError as e:
        raise NnobsError(f"frontier config {str(path)!r} is not valid TOML: {e}") from e
    tables.setdefault("frontier", {}).setdefault("name", path.stem)
    return parse_frontier(tables, str(path))
