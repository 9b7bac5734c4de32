"""Controlled architecture studies: which variants keep the decision-quality signal in training.

A study trains every architecture variant with every training seed, observes every checkpoint
of every run (:func:`nnobs.observe.trajectory.observe_run`) and writes one ``study.json`` (schema
``nnobs.study``) that holds, per variant, each seed's trajectory numbers, the final pcorr with a
confidence interval across seeds, the collapse verdicts, and the effect against the baseline.

**Controls.** Variants are matched in parameter count to the baseline variant (one width is
adjusted by :func:`nnobs.models.config.match_params`: ``match_params_by = "d_mlp"`` or
``"d_model"``; ``"none"`` where the parameter count is the variable studied, as in
over-parameterisation). Every run sees the same tokens in the same order: the data order is
fixed by the study's ``data_seed`` (``TrainConfig.data_seed``) and the training seed varies
only the initialisation, so seed-to-seed spread is initialisation variance and a difference
between variants is not a difference in data.

**Statistics.** A run's value is the final checkpoint's pcorr at its best layer on the test
split (the ensemble of probe seeds: their standardised scores averaged). Across training seeds
a variant reports the mean and a 95% t-interval (df = seeds − 1: honest, and wide with few
seeds); the effect of a variant is its mean minus the baseline's with a Welch 95% interval.
Seeds are the unit of replication: token-level bootstrap intervals (in each trajectory)
describe one run only.

**Config** (TOML): see :mod:`nnobs.observe.study_config`; the result's statistics are in
:mod:`nnobs.observe.study_summary`.

**Layout.** ``OUT/study.json``, ``OUT/config.json`` (the resolved study) and
``OUT/runs/<variant>/seed_<k>/`` (a run directory with ``trajectory/trajectory.json``).
Runs go to ``jobs`` worker processes, which die with the study's process; re-running the same
study resumes: finished runs and trajectories are reused, interrupted runs resume from their
last checkpoint. The study directory and each run directory have one writer at a time
(:func:`nnobs.core.lock.lock_directory`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnobs.core.errors import NnobsError
from nnobs.core.files import write_json
from nnobs.core.lock import lock_directory
from nnobs.core.workers import run_jobs
from nnobs.models.config import ModelConfig
from nnobs.observe.study_config import StudyConfig, study_run_dir, variant_configs
from nnobs.observe.study_summary import assemble, observed_checkpoints
from nnobs.observe.trajectory import TrajectorySettings
from nnobs.training.config import TrainConfig


@dataclass
class Unit:
    """One training run of a study: a variant at a training seed."""

    variant: str
    seed: int
    run_dir: Path
    model: ModelConfig
    train: TrainConfig
    observe: TrajectorySettings


_BUSY_RUN = "wait for it or stop it, then re-run the study"


def run_unit(unit: Unit) -> dict[str, Any]:
    """Train (or resume, or find finished) one run, then observe its checkpoints, holding the
    run directory's lock throughout (a stray process working there refuses this one)."""
    from nnobs.observe.trajectory import observe_run
    from nnobs.training.trainer import train

    start = time.perf_counter()
    with lock_directory(unit.run_dir, "run directory", _BUSY_RUN):
        run = train(unit.model, unit.train, unit.run_dir, progress=False)
        trained = time.perf_counter()
        trajectory = observe_run(unit.run_dir, settings=unit.observe, progress=False)
    observed_checkpoints(trajectory, unit.run_dir)  # none measured: the run fails, reported so
    if run.already_complete:
        status = "complete"
    else:
        status = "resumed" if run.resumed_from is not None else "trained"
    return {
        "variant": unit.variant,
        "seed": unit.seed,
        "status": status,
        "train_seconds": round(trained - start, 3),
        "observe_seconds": round(time.perf_counter() - trained, 3),
    }


def _warm_caches(cfg: StudyConfig) -> None:
    """Tokenizer and token caches built once here, not raced for by every worker."""
    from nnobs.data.corpus import load_corpus
    from nnobs.data.encoding import token_stream
    from nnobs.data.tokenizer import get_tokenizer

    corpus = load_corpus(cfg.train.corpus, max_chars=cfg.train.max_chars)
    vocab = max(c.vocab_size for c in variant_configs(cfg).values())
    tokenizer = get_tokenizer(cfg.train.tokenizer, corpus, vocab)
    for split in (corpus.train, corpus.validation):
        token_stream(split, tokenizer)


def run_study(
    cfg: StudyConfig,
    out_dir: str | Path,
    *,
    jobs: int = 1,
    log: Callable[[str], None] = lambda _msg: None,
) -> dict[str, Any]:
    """Run (or resume) every variant × seed, observe them, and write ``OUT/study.json``."""
    from nnobs.core.results import write_result

    if jobs < 1:
        raise NnobsError(f"jobs must be a positive integer, got {jobs}")
    out = Path(out_dir)
    configs = variant_configs(cfg)
    units = [
        Unit(
            v.name,
            seed,
            study_run_dir(out, v.name, seed),
            configs[v.name],
            cfg.train.replace(seed=seed, data_seed=cfg.data_seed),
            cfg.observe,
        )
        for v in cfg.variants
        for seed in cfg.seeds
    ]
    with lock_directory(out, "study directory"):
        _claim(cfg, out)
        start = time.perf_counter()
        size = f"{len(cfg.variants)} variants × {len(cfg.seeds)} seeds"
        log(f"study {cfg.name}: {size}, {jobs} job(s)")
        _warm_caches(cfg)
        outcomes = _run_units(units, jobs, log)
        result = assemble(cfg, out, configs, outcomes, time.perf_counter() - start)
        write_result(out / "study.json", result)
    return result


def _claim(cfg: StudyConfig, out: Path) -> None:
    """Write the resolved study to ``OUT/config.json``, unless OUT holds a different study."""
    from nnobs.core.files import read_json
    from nnobs.core.results import to_plain

    previous = out / "config.json"
    resolved = to_plain(cfg.to_dict())
    stored = read_json(previous, "study config") if previous.is_file() else None
    if isinstance(stored, dict) and isinstance(stored.get("model"), dict):
        stored["model"] = ModelConfig.upgrade_dict(stored["model"])  # older versions' studies
    if stored is not None and stored != resolved:
        raise NnobsError(f"{str(out)!r} holds a different study; use a new --out or delete it")
    write_json(previous, resolved)


def _run_units(
    units: list[Unit], jobs: int, log: Callable[[str], None]
) -> dict[tuple[str, int], dict[str, Any]]:
    """Every unit's outcome by (variant, seed), in ``jobs`` worker processes; NnobsErrors are
    collected so the other runs finish, and reported together."""
    outcomes, failures = {}, []

    def done(unit: Unit, outcome: dict | None, error: BaseException | None) -> None:
        what = f"{unit.variant} seed {unit.seed}"
        if error is not None:
            failures.append(f"{what}: {error}")
        else:
            outcomes[(unit.variant, unit.seed)] = outcome
        count = f"[{len(outcomes) + len(failures)}/{len(units)}]"
        if error is not None:
            log(f"{count} {what} failed: {error}")
        else:
            log(
                f"{count} {what}: {outcome['status']}, train {outcome['train_seconds']:.0f} s, "
                f"observe {outcome['observe_seconds']:.0f} s"
            )

    run_jobs(units, run_unit, jobs, done)
    if failures:
        raise NnobsError(
            f"{len(failures)} of {len(units)} runs failed ({'; '.join(failures)}); the others "
            "are kept: fix the cause and re-run the same command to resume"
        )
    return outcomes
