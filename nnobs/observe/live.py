"""Live observability: the trajectory's tracked subset measured while a model trains.

:class:`ObservabilityCallback` plugs into nnobs's trainer (``train(..., on_checkpoint=cb)``,
or ``nnobs train --observe``); :class:`~nnobs.observe.live_hf.HFObservabilityCallback` into a
Hugging Face ``Trainer``. Both measure at checkpoint steps and rewrite ``trajectory.json`` (schema
``nnobs.trajectory``, ``mode: live``) after every checkpoint, so a run stopped at any point
leaves a valid result.

**Budget.** Observation may cost at most ``budget`` (default 10%) of the projected training
time (training time so far × total steps / steps done). Step 0 is always measured (it is the
random-init model that defines the detection floor), and the cost of one full measurement is
held back for the last step, which collapse detection needs. Any other checkpoint is measured
in full if it fits, on a prefix of the token windows (``shrunk``, at least ``min_fraction``)
if only that fits, and otherwise skipped; every record says which and why, and the result's
``budget`` entry reports the overhead actually spent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnobs.core.errors import NnobsError
from nnobs.core.rundir import RunDir
from nnobs.data.corpus import Corpus, load_corpus
from nnobs.models.adapter import ModelAdapter
from nnobs.observe.trajectory import OBSERVED, TrajectoryObserver, TrajectorySettings


def live_settings() -> TrajectorySettings:
    """Cheaper defaults for measuring while training: a smaller token budget and fewer
    bootstrap resamples and random heads than the post-hoc trajectory."""
    return TrajectorySettings(ex_per_dim=50, n_boot=100, random_heads=50)


class LiveObserver:
    """The budget and the result file shared by the nnobs and Hugging Face callbacks."""

    def __init__(
        self,
        out_path: Path,
        corpus: Corpus,
        settings: TrajectorySettings | None = None,
        budget: float = 0.10,
        min_fraction: float = 0.25,
        progress: bool = False,
        log: Callable[[str], None] = lambda _msg: None,
    ) -> None:
        if not budget > 0:
            raise NnobsError(f"budget is a positive fraction of training time, got {budget}")
        if not 0 < min_fraction <= 1:
            raise NnobsError(f"min_fraction must be in (0, 1], got {min_fraction}")
        self.out_path = Path(out_path)
        self.budget, self.min_fraction, self.log = budget, min_fraction, log
        self.observer = TrajectoryObserver(corpus, settings or live_settings(), progress=progress)
        self.spent = 0.0  # seconds spent observing, this process and earlier ones of the run
        self.full_cost: float | None = None  # seconds of one full measurement
        self.train_seconds = 0.0
        self._resumed = False

    def _resume(self, step: int) -> None:
        """Keep the records of an earlier process of this run (before ``step``)."""
        from nnobs.core.results import load_result, to_plain

        self._resumed = True
        if not self.out_path.is_file():
            return
        try:
            previous = load_result(self.out_path, "nnobs.trajectory")
        except NnobsError:
            return
        if previous.get("settings") != to_plain(asdict(self.observer.settings)):
            return
        for record in previous["checkpoints"]:
            if record["step"] < step:
                self.observer.records[record["step"]] = record
                self.spent += record["seconds"]
                if record["status"] == "observed":
                    self.full_cost = record["seconds"]

    def plan(self, step: int, total_steps: int) -> tuple[float, str | None]:
        """(token fraction, note) for this checkpoint; fraction 0 means skip."""
        if step == 0 or self.full_cost is None:
            return 1.0, None
        projected = self.train_seconds * total_steps / step
        left = self.budget * projected - self.spent
        if step < total_steps:
            left -= self.full_cost  # held back for the last checkpoint
        if self.full_cost <= left:
            return 1.0, None
        fraction = left / self.full_cost
        if fraction >= self.min_fraction:
            return fraction, f"shrunk to {fraction:.0%} of the tokens to stay within budget"
        need = f"needs ~{self.full_cost:.1f} s, {max(left, 0):.1f} s of budget left"
        if step >= total_steps:  # the last checkpoint is never skipped
            return self.min_fraction, f"over budget ({need}); measured at the minimum size"
        return 0.0, f"skipped: over the {self.budget:.0%} observation budget ({need})"

    def checkpoint(
        self,
        adapter: ModelAdapter,
        step: int,
        total_steps: int,
        train_seconds: float,
        meta: dict[str, Any],
        loss_curve: list[dict[str, Any]],
        run: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Measure (or skip) one checkpoint within budget and rewrite the result file."""
        if not self._resumed:
            self._resume(step)
        self.train_seconds = train_seconds
        fraction, note = self.plan(step, total_steps)
        if fraction == 0:
            self.observer.skip(step, note, meta)
            record = self.observer.records[step]
        else:
            start = time.perf_counter()
            record = self.observer.observe(adapter, step, meta=meta, fraction=fraction, note=note)
            seconds = time.perf_counter() - start
            self.spent += seconds
            if record["status"] == "observed":
                self.full_cost = seconds
            elif record["status"] == "shrunk":
                self.full_cost = seconds / fraction
        why = record["note"]  # the plan's note, or why the measurement failed
        self.log(f"step {step}: {record['status']}" + (f" ({why})" if why else ""))
        self.write(loss_curve, run)
        return record

    def write(self, loss_curve: list[dict[str, Any]], run: dict[str, Any] | None) -> None:
        from nnobs.core.results import to_plain, write_result

        result = self.observer.document(loss_curve, mode="live", run=run)
        records = result["checkpoints"]
        result["budget"] = {
            "fraction": self.budget,
            "min_fraction": self.min_fraction,
            "observe_seconds": round(self.spent, 3),
            "train_seconds": round(self.train_seconds, 3),
            "overhead": self.spent / self.train_seconds if self.train_seconds > 0 else None,
            "skipped": [r["step"] for r in records if r["status"] == "skipped"],
            "shrunk": [r["step"] for r in records if r["status"] == "shrunk"],
        }
        write_result(self.out_path, to_plain(result))

    def close(self) -> None:
        self.observer.close()


class Measuring:
    """Eval mode and untouched RNG streams while measuring; the training state comes back."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.was_training = model.training
        device = next(model.parameters()).device
        self.fork = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])

    def __enter__(self) -> None:
        self.fork.__enter__()

    def __exit__(self, *exc) -> None:
        self.fork.__exit__(*exc)
        self.model.train(self.was_training)


class ObservabilityCallback:
    """Live observability for nnobs's trainer: ``train(..., on_checkpoint=callback)``.

    Writes ``RUN/trajectory/trajectory.json`` (or ``out_path``). The corpus defaults to the
    run's own (same spec and size cap, read from ``run.json``), so the probe is fit and
    scored on held-out halves of its validation split.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        corpus: str | Corpus | None = None,
        settings: TrajectorySettings | None = None,
        budget: float = 0.10,
        min_fraction: float = 0.25,
        out_path: str | Path | None = None,
        progress: bool = False,
        log: Callable[[str], None] = lambda _msg: None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.corpus, self.settings = corpus, settings
        self.budget, self.min_fraction = budget, min_fraction
        self.out_path = Path(out_path) if out_path else RunDir(run_dir).trajectory_file
        self.progress, self.log = progress, log
        self.live: LiveObserver | None = None
        self._tokenizer = None
        self.outcomes: dict[int, tuple[str, str | None]] = {}  # step -> (status, note)

    def _start(self) -> LiveObserver:
        from nnobs.observe.trajectory import run_corpus

        corpus = self.corpus
        if isinstance(corpus, str):
            corpus = load_corpus(corpus)
        corpus = corpus or run_corpus(self.run_dir)
        return LiveObserver(
            self.out_path,
            corpus,
            self.settings,
            self.budget,
            self.min_fraction,
            self.progress,
            self.log,
        )

    def __call__(self, step: int, model: nn.Module, meta: dict[str, Any]) -> None:
        from nnobs.core.rundir import read_metrics
        from nnobs.models.adapter import nnobs_adapter
        from nnobs.models.checkpoint import checkpoint_provenance, load_run_tokenizer
        from nnobs.observe.trajectory import loss_curve_from_metrics, run_summary

        self.live = self.live or self._start()
        run_dir = RunDir(self.run_dir)
        if self._tokenizer is None:
            self._tokenizer = load_run_tokenizer(run_dir, meta.get("tokenizer"))
        path = run_dir.checkpoint_dir(step)
        provenance = checkpoint_provenance(path, meta, model.config.hash)
        adapter = nnobs_adapter(model, self._tokenizer, provenance)
        train_seconds = max(float(meta.get("elapsed_s") or 0.0) - self.live.spent, 1e-9)
        with Measuring(model):
            record = self.live.checkpoint(
                adapter,
                step,
                meta["total_steps"],
                train_seconds,
                meta,
                loss_curve_from_metrics(read_metrics(self.run_dir)),
                run_summary(self.run_dir),
            )
        self.outcomes[step] = (record["status"], record["note"])
        if step >= meta["total_steps"]:
            self.close()

    def check_observed(self) -> str | None:
        """After training: a line on the checkpoints that failed to be measured (None when
        none did); an NnobsError when not one checkpoint this process met was measured."""
        failed = {
            step: note for step, (status, note) in self.outcomes.items() if status == "failed"
        }
        if not failed:
            return None
        first = failed[min(failed)]
        if not any(status in OBSERVED for status, _ in self.outcomes.values()):
            raise NnobsError(
                f"observation failed at every checkpoint ({first}); the trained run in "
                f"{str(self.run_dir)!r} is kept: observe it on another corpus with nnobs observe "
                f"--model {self.run_dir} --all-checkpoints --corpus SPEC"
            )
        return (
            f"observation failed at {len(failed)} of {len(self.outcomes)} checkpoints (steps "
            f"{', '.join(map(str, sorted(failed)))}; first: {first}); see {self.out_path}"
        )

    def close(self) -> None:
        if self.live is not None:
            self.live.close()
            self.live = None
