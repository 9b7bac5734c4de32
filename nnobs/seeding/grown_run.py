"""A grown model as a run directory: ``run.json`` naming its parent, the parent's tokenizer
and checkpoint ``step_000000`` holding the grown weights, so training it is resuming a run
from step 0 (``nnobs train --config LARGE.toml --out DIR``)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from nnobs.core.errors import NnobsError
from nnobs.core.files import check_output_dir
from nnobs.core.rundir import RunDir, list_checkpoints
from nnobs.core.version import __version__
from nnobs.models.checkpoint import load_checkpoint
from nnobs.models.config import ModelConfig
from nnobs.seeding.grow import GrowthPlan, grow_model, max_logit_difference
from nnobs.training.config import TrainConfig
from nnobs.training.derived import write_derived_run
from nnobs.training.schedule import eval_starts
from nnobs.training.tokens import load_streams

# Logits of the grown model may differ from the small model's by float rounding only (sums
# with extra exact zeros in them): more than this is a bug, and nothing is written.
MAX_LOGIT_DIFFERENCE = 1e-4
CHECK_WINDOWS = 16


def finished_run(run: str | os.PathLike) -> tuple[RunDir, dict[str, Any]]:
    """The run directory and its run.json, refused unless its last step is saved."""
    run_dir = RunDir(run)
    if not run_dir.is_run():
        raise NnobsError(f"{str(run)!r} is not an nnobs run directory (no run.json)")
    description = run_dir.read_run()
    steps = description.get("train_config", {}).get("steps")
    found = list_checkpoints(run)
    last = found[-1][0] if found else None
    if last is None or last != steps:
        raise NnobsError(
            f"run {str(run)!r} has no finished checkpoint (last saved step {last}, of {steps}): "
            "finish training it first (nnobs train resumes it)"
        )
    return run_dir, description


def grow_run(
    small_run: str | os.PathLike,
    large_model: ModelConfig,
    large_train: TrainConfig,
    out: str | os.PathLike,
    layer_map: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Grow ``small_run``'s final model into ``large_model`` and write the grown run to
    ``out`` (absent or empty), all at once; returns the ``grown_from`` provenance.

    The new units are initialised from ``large_train.seed``, as a fresh run of the large
    config would be. Refused in one line, with nothing written: a config the small model
    cannot be embedded in exactly, another tokenizer, an unfinished small run, a grown model
    whose logits differ by more than :data:`MAX_LOGIT_DIFFERENCE`.
    """
    out = check_output_dir(out)
    if out.exists() and any(out.iterdir()):
        raise NnobsError(f"--out {str(out)!r} is not empty: give a new directory for the run")
    run_dir, description = finished_run(small_run)
    small_tokenizer = description.get("train_config", {}).get("tokenizer")
    if small_tokenizer != large_train.tokenizer:
        raise NnobsError(
            f"the large config's tokenizer is {large_train.tokenizer!r} but the small run's is "
            f"{small_tokenizer!r}: a grown model keeps its parent's tokenizer"
        )
    loaded = load_checkpoint(small_run)
    plan = GrowthPlan.of(loaded.config, large_model, layer_map)
    streams = load_streams(large_train, large_model, run_dir, description["tokenizer"])
    started = time.perf_counter()
    grown = grow_model(loaded.model, plan, seed=large_train.seed)
    grow_s = time.perf_counter() - started
    length = min(loaded.config.max_seq_len, large_train.seq_len)
    starts = eval_starts(len(streams.validation), length, CHECK_WINDOWS)
    windows = torch.from_numpy(streams.validation[starts[:, None] + range(length)]).long()
    difference = max_logit_difference(loaded.model, grown, windows)
    if not difference <= MAX_LOGIT_DIFFERENCE:
        raise NnobsError(
            f"the grown model's logits differ from the small model's by {difference:.3g} "
            f"(more than {MAX_LOGIT_DIFFERENCE:g}): not function-preserving; nothing written"
        )
    provenance = {
        "run": str(Path(small_run).resolve()),
        "checkpoint": loaded.provenance(),
        "small_config_hash": loaded.config.hash,
        **plan.to_dict(),
        "init_seed": large_train.seed,
        "max_logit_difference": difference,
        "checked_tokens": int(windows.numel()),
        "grow_s": round(grow_s, 4),
        "nnobs_version": __version__,
    }
    write_derived_run(out, grown, large_model, large_train, streams, "grown_from", provenance)
    return provenance
