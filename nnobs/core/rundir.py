"""The layout of an nnobs run directory, in one place.

A run directory holds ``run.json`` (what was trained, on what), ``metrics.jsonl``,
``tokenizer.json`` (a trained BPE) and ``checkpoints/step_NNNNNN/`` (each complete once its
``meta.json`` exists; see :mod:`nnobs.training.checkpoint` for how one is written), and the
results computed from it: ``observe/``, ``trajectory/`` and ``report/``. While a trainer
works in it, ``.lock`` is held (:func:`nnobs.core.lock.lock_directory`): one writer at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

from nnobs.core.errors import NnobsError
from nnobs.core.files import read_json

CHECKPOINT_FORMAT = "nnobs-checkpoint/1"


RUN_FORMAT = "nnobs-run/1"


class RunDir:
    """Where each file of a run directory lives: ``RunDir("runs/default").metrics_file``."""

    # Entries a run directory may hold; anything else means the directory is not a run. The
    # last three are results computed from the run's weights.
    ENTRIES = frozenset(
        {"run.json", "tokenizer.json", "metrics.jsonl", "checkpoints"}
        | {"observe", "trajectory", "report"}
    )

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @classmethod
    def of_checkpoint(cls, checkpoint: str | os.PathLike) -> RunDir:
        """The run a checkpoint directory (``RUN/checkpoints/step_N``) belongs to."""
        return cls(Path(checkpoint).parent.parent)

    @property
    def run_file(self) -> Path:
        return self.path / "run.json"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tokenizer_file(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / step_dir_name(step)

    @property
    def observe_dir(self) -> Path:
        """Where ``nnobs observe`` writes by default."""
        return self.path / "observe"

    @property
    def trajectory_dir(self) -> Path:
        """Where the run's trajectory (post hoc or live) is written by default."""
        return self.path / "trajectory"

    @property
    def trajectory_file(self) -> Path:
        return self.trajectory_dir / "trajectory.json"

    def is_run(self) -> bool:
        return self.run_file.is_file()

    def read_run(self) -> dict[str, Any]:
        """The run description (``run.json``)."""
        return read_json(self.run_file, "run description")

    def tokenizer_reference(self, reference: dict[str, Any]) -> dict[str, Any]:
        """``reference`` with a BPE tokenizer read from this run's own copy (runs can move)."""
        reference = dict(reference)
        if reference.get("kind") == "bpe" and self.tokenizer_file.is_file():
            reference["path"] = str(self.tokenizer_file)
        return reference


_STEP_DIR = re.compile(r"step_(\d+)")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The run's metrics records; a line cut short by a kill is skipped."""
    path = RunDir(run_dir).metrics_file
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict) and "step" in record:
                records.append(record)
    return records


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, ``(step, path)`` sorted by step."""
    root = RunDir(run_dir).checkpoints_dir
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
    if RunDir(path).is_run() or (path / "meta.json").is_file():
        return True
    return bool(_STEP_DIR.fullmatch(path.name)) and path.parent.name == "checkpoints"


def resolve_checkpoint(path: str | os.PathLike, step: int | None = None) -> Path:
    """The checkpoint directory meant by a run directory (latest, or ``step``) or itself."""
    path = Path(path)
    if not path.exists():
        raise NnobsError(f"{str(path)!r} does not exist: give an nnobs run or checkpoint directory")
    run = RunDir(path)
    if run.is_run() or run.checkpoints_dir.is_dir():
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
