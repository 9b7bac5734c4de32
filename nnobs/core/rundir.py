"""The layout of an nnobs run directory, in one place.

A run directory holds ``run.json`` (what was trained, on what), ``metrics.jsonl``,
``tokenizer.json`` (a trained BPE) and ``checkpoints/step_NNNNNN/`` (each complete once its
``meta.json`` exists; see :mod:`nnobs.training.checkpoint` for how one is written).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from nnobs.core.errors import NnobsError
from nnobs.core.files import read_json

CHECKPOINT_FORMAT = "nnobs-checkpoint/1"


RUN_FORMAT = "nnobs-run/1"


_STEP_DIR = re.compile(r"step_(\d+)")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, ``(step, path)`` sorted by step."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.fullmatch(entry.name)
        if match and (entry / "meta.json").is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def is_nnobs_path(path: str | os.PathLike) -> bool:
    """True for an nnobs run directory or checkpoint directory (complete or damaged).

    A damaged checkpoint of ours still counts, so loading it reports what is wrong with it
    instead of trying it as some other kind of model.
    """
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / "run.json").is_file() or (path / "meta.json").is_file():
        return True
    return bool(_STEP_DIR.fullmatch(path.name)) and path.parent.name == "checkpoints"


def resolve_checkpoint(path: str | os.PathLike, step: int | None = None) -> Path:
    """The checkpoint directory meant by a run directory (latest, or ``step``) or itself."""
    path = Path(path)
    if not path.exists():
        raise NnobsError(f"{str(path)!r} does not exist: give an nnobs run or checkpoint directory")
    if (path / "run.json").is_file() or (path / "checkpoints").is_dir():
        found = list_checkpoints(path)
        if not found:
            raise NnobsError(
                f"run {str(path)!r} has no complete checkpoint yet: train it (nnobs train) first"
            )
        if step is None:
            return found[-1][1]
        for s, p in found:
            if s == step:
                return p
        steps = ", ".join(str(s) for s, _ in found)
        raise NnobsError(f"run {str(path)!r} has no checkpoint at step {step}: it has {steps}")
    if not is_nnobs_path(path):
        raise NnobsError(
            f"{str(path)!r} is not an nnobs run or checkpoint directory "
            "(no run.json or meta.json in it)"
        )
    if not (path / "meta.json").is_file():
        raise NnobsError(
            f"checkpoint {str(path)!r} is incomplete or damaged: meta.json is missing; "
            "delete it and resume the run to rewrite it"
        )
    return path


def read_meta(ckpt: Path) -> dict[str, Any]:
    meta = read_json(ckpt / "meta.json", "checkpoint metadata")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise NnobsError(
            f"{str(ckpt)!r} is not an nnobs checkpoint (meta.json has format "
            f"{meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r})"
        )
    return meta
