"""Starting or resuming a run in its directory.

A run starts in an empty directory, resumes from the latest complete checkpoint of the same
run (same model and train configs, same corpus), or is found finished and left as it is. A
directory holding anything else is refused, so nothing is ever written over by mistake.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnobs.core.errors import NnobsError
from nnobs.core.fields import is_int, is_number
from nnobs.core.files import check_output_dir, write_json, write_text
from nnobs.core.rundir import RUN_FORMAT, RunDir, list_checkpoints, read_meta, read_metrics
from nnobs.core.version import __version__
from nnobs.models.checkpoint import load_weights
from nnobs.models.config import ModelConfig
from nnobs.models.sizing import count_params
from nnobs.training.checkpoint import damaged, load_training_state, remove_partial
from nnobs.training.config import TrainConfig
from nnobs.training.distributed import Distributed
from nnobs.training.tokens import TokenStreams, load_streams, unigram_loss

log = logging.getLogger("nnobs.training")

# Fields that do not change what a run computes: a run may resume with them changed.
RESUMABLE_CHANGES = frozenset({"device"})


@dataclass
class RunResult:
    out_dir: Path
    step: int
    val_loss: float | None
    unigram_loss: float
    tokens_seen: int
    elapsed_s: float
    resumed_from: int | None = None
    already_complete: bool = False


@dataclass
class RunStart:
    """A run ready to train: its description, its tokens, the checkpoint it resumes from."""

    run: dict[str, Any]  # run.json (on other ranks than the main one, the baseline alone)
    streams: TokenStreams
    checkpoint: tuple[int, Path] | None  # (step, path) of the latest complete checkpoint


def start_or_resume(
    out: Path, mc: ModelConfig, tc: TrainConfig, dd: Distributed, overwrite: bool
) -> RunStart | RunResult:
    """Prepare OUT for this run and load its tokens, or return the result of a finished run.

    Nothing is written (nor, with ``overwrite``, deleted) until the corpus and tokens are
    known to fit the settings: a refused setting leaves OUT as it was.
    """
    run = check_out_dir(out, mc, tc, overwrite)
    found = list_checkpoints(out) if run else []
    if found and found[-1][0] >= tc.steps:
        return _finished(out, run, found[-1], dd)

    # Rank 0 builds the tokenizer and token caches first; the others then read them.
    if not dd.main:
        dd.barrier()
    streams = load_streams(tc, mc, RunDir(out), run["tokenizer"] if run else None)
    if dd.main:
        dd.barrier()
    if run and run["corpus"]["fingerprint"] != streams.corpus.fingerprint:
        raise NnobsError(
            f"corpus {tc.corpus!r} changed since the run in {str(out)!r} started (fingerprint "
            f"{streams.corpus.fingerprint} vs {run['corpus']['fingerprint']}): use a new --out"
        )
    if run is None:
        baseline = unigram_loss(streams.train, streams.validation, mc.vocab_size)
        if dd.main:
            if overwrite:
                clear_run(out)
            out.mkdir(parents=True, exist_ok=True)
            run = write_run(out, mc, tc, streams, baseline)
        else:
            run = {"unigram_baseline_loss": baseline}
    if dd.main:
        remove_partial(out)
    return RunStart(run, streams, found[-1] if found else None)


def _finished(
    out: Path, run: dict[str, Any], checkpoint: tuple[int, Path], dd: Distributed
) -> RunResult:
    step, path = checkpoint
    meta = read_meta(path)
    if dd.main:
        log.info(f"{out} is already trained to step {step}; nothing to do")
    return RunResult(
        out_dir=out,
        step=step,
        val_loss=meta.get("val_loss"),
        unigram_loss=run["unigram_baseline_loss"],
        tokens_seen=meta.get("tokens_seen", 0),
        elapsed_s=meta.get("elapsed_s", 0.0),
        resumed_from=step,
        already_complete=True,
    )


def restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Weights, optimizer and RNG state from the checkpoint at ``path``; its metadata."""
    meta = read_meta(path)
    # The counts the resumed run goes on from (older checkpoints have no elapsed_s).
    for key, value, valid in (
        ("tokens_seen", meta.get("tokens_seen"), is_int),
        ("elapsed_s", meta.get("elapsed_s", 0.0), is_number),
    ):
        if not valid(value) or value < 0:
            raise damaged(path, f"meta.json has {key} {value!r}, not a count")
    load_weights(model, path)
    load_training_state(path, optimizer)
    return meta


def truncate_metrics(out: Path, step: int) -> None:
    """Keep only records up to ``step``: the resumed run logs the rest again."""
    path = RunDir(out).metrics_file
    if path.exists():
        kept = [r for r in read_metrics(out) if r["step"] <= step]
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def _config_diff(stored: dict, requested: dict, skip=frozenset()) -> str | None:
    for key in sorted(set(stored) | set(requested)):
        if key not in skip and stored.get(key) != requested.get(key):
            return f"{key} {stored.get(key)!r} in the run vs {requested.get(key)!r} requested"
    return None


def check_out_dir(
    out: Path, mc: ModelConfig, tc: TrainConfig, overwrite: bool
) -> dict[str, Any] | None:
    """Check OUT can hold this run; return its run.json if it already holds it."""
    check_output_dir(out)
    present = out.iterdir() if out.exists() else ()
    entries = {p.name for p in present if not p.name.startswith(".")}
    if entries - RunDir.ENTRIES:
        raise NnobsError(
            f"{str(out)!r} is not an empty directory or an nnobs run (it holds "
            f"{', '.join(sorted(entries - RunDir.ENTRIES)[:3])}): use a new --out"
        )
    run_dir = RunDir(out)
    if overwrite or not run_dir.is_run():
        return None
    run = run_dir.read_run()
    if run.get("format") != RUN_FORMAT:
        raise NnobsError(f"{str(run_dir.run_file)!r} is not an nnobs run description")
    stored_model = ModelConfig.upgrade_dict(run.get("model_config", {}))  # runs of older versions
    for what, stored, requested, skip in (
        ("model config", stored_model, mc.to_dict(), frozenset()),
        ("train config", run.get("train_config", {}), tc.to_dict(), RESUMABLE_CHANGES),
    ):
        diff = _config_diff(stored, requested, skip)
        if diff:
            raise NnobsError(
                f"{str(out)!r} holds a different run ({what} differs: {diff}); "
                "use a new --out or --overwrite"
            )
    return run


def clear_run(out: Path) -> None:
    """Delete the run and the results computed from it (they describe the old weights)."""
    for name in RunDir.ENTRIES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def write_run(
    out: Path, mc: ModelConfig, tc: TrainConfig, streams: TokenStreams, baseline: float
) -> dict[str, Any]:
    """Save the tokenizer and write ``run.json``: what is trained, on what."""
    tokenizer_ref = streams.tokenizer.save(out)
    run = {
        "format": RUN_FORMAT,
        "nnobs_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model_config": mc.to_dict(),
        "model_config_hash": mc.hash,
        "train_config": tc.to_dict(),
        "corpus": {
            "spec": tc.corpus,
            "fingerprint": streams.corpus.fingerprint,
            "source": streams.corpus.source,
            "tokens": {
                "train": int(len(streams.train)),
                "validation": int(len(streams.validation)),
            },
        },
        "tokenizer": tokenizer_ref,
        "n_params": count_params(mc),
        "unigram_baseline_loss": baseline,
    }
    run_dir = RunDir(out)
    run_dir.metrics_file.unlink(missing_ok=True)
    write_json(run_dir.run_file, run)
    return run
