"""Fine-tuning a run on another corpus, as a new run whose provenance names its parent.

The new run directory is written whole before training starts: ``run.json`` (the parent's
model config, its train config with the new corpus and step count, and ``finetuned_from``:
the parent run and checkpoint), the parent's tokenizer, and checkpoint ``step_000000`` holding
the parent's final weights with a fresh optimizer. Training it is then resuming a run from
step 0 with the ordinary trainer, so a fine-tuning run killed part-way resumes like any run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nnobs.core.errors import NnobsError
from nnobs.core.files import check_output_dir
from nnobs.core.rundir import RunDir
from nnobs.models.checkpoint import load_checkpoint
from nnobs.training.config import TrainConfig
from nnobs.training.derived import write_derived_run
from nnobs.training.tokens import load_streams

# More passes than this over the new corpus's training split is memorising it, not tuning on it.
MAX_PASSES = 10.0


def finetune_config(parent: TrainConfig, corpus: str, steps: int, lr: float | None) -> TrainConfig:
    """The parent's training settings on ``corpus`` for ``steps`` updates (at ``lr``, default the
    parent's peak rate), with warm-up and logging scaled to the shorter run."""
    return parent.replace(
        corpus=corpus,
        max_chars=None,
        steps=steps,
        lr=parent.lr if lr is None else lr,
        warmup_steps=min(parent.warmup_steps, steps // 10),
        eval_every=min(parent.eval_every, steps),
        log_every=min(parent.log_every, steps),
        first_checkpoint=min(parent.first_checkpoint, steps),
        checkpoint_every=steps,
    )


def prepare_finetune(
    parent: str | os.PathLike,
    corpus: str,
    steps: int,
    out: str | os.PathLike,
    *,
    lr: float | None = None,
    device: str = "auto",
) -> tuple[Any, TrainConfig, dict[str, Any]]:
    """Write the fine-tuning run into ``out`` (absent or empty) from ``parent``'s latest
    checkpoint; returns (model config, train config, the ``finetuned_from`` provenance).
    Refused in one line with nothing written: no parent run, a corpus that is empty or too
    small for ``steps``."""
    out = check_output_dir(out)
    if out.exists() and any(out.iterdir()):
        raise NnobsError(f"--out {str(out)!r} is not empty: give a new directory for the run")
    run_dir = RunDir(parent)
    if not run_dir.is_run():
        raise NnobsError(f"{str(parent)!r} is not an nnobs run directory (no run.json)")
    description = run_dir.read_run()
    loaded = load_checkpoint(parent)
    tc = TrainConfig.from_dict(description["train_config"])
    tc = finetune_config(tc, corpus, steps, lr).replace(device=device)
    streams = load_streams(tc, loaded.config, run_dir, description["tokenizer"])
    passes = steps * tc.batch_size * tc.seq_len / len(streams.train)
    if passes > MAX_PASSES:
        raise NnobsError(
            f"corpus {corpus!r} is too small for {steps} steps: its {len(streams.train)} "
            f"training tokens would be read {passes:.0f} times (at most {MAX_PASSES:.0f}); "
            "ask for fewer steps or give a larger corpus"
        )
    provenance = {
        "run": str(Path(parent).resolve()),
        "checkpoint": loaded.provenance(),
        "corpus": description["corpus"]["spec"],
        "passes": round(passes, 3),
    }
    write_derived_run(out, loaded.model, loaded.config, tc, streams, "finetuned_from", provenance)
    return loaded.config, tc, provenance
