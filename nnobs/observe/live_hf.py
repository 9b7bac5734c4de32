"""Live observability for a Hugging Face ``Trainer``: :class:`HFObservabilityCallback`.

The class derives from transformers' ``TrainerCallback``, so it is built on first use (module
``__getattr__``): nnobs's own trainer never imports transformers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from nnobs.data.corpus import Corpus, load_corpus
from nnobs.observe.live import LiveObserver, Measuring
from nnobs.observe.trajectory import TrajectorySettings


class _HFObserver:
    """What :class:`HFObservabilityCallback` does at a step of a Hugging Face ``Trainer``;
    the callback adds only the ``TrainerCallback`` events that call it."""

    def __init__(
        self,
        corpus: str | Corpus,
        tokenizer: Any,
        out_dir: str | Path,
        *,
        settings: TrajectorySettings | None = None,
        budget: float = 0.10,
        min_fraction: float = 0.25,
        steps: list[int] | None = None,
        trained_on_corpus: bool = True,
        progress: bool = False,
        log: Callable[[str], None] = lambda _msg: None,
    ) -> None:
        from nnobs.data.tokenizer import Tokenizer, from_hf

        corpus = load_corpus(corpus) if isinstance(corpus, str) else corpus
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else from_hf(tokenizer)
        self.fingerprint = corpus.fingerprint if trained_on_corpus else None
        self.steps = None if steps is None else set(steps)
        self.out_dir = Path(out_dir)
        self.live = LiveObserver(
            self.out_dir / "trajectory.json",
            corpus,
            settings,
            budget,
            min_fraction,
            progress,
            log,
        )
        self._t0: float | None = None

    def observe(self, args: Any, state: Any, model: nn.Module | None) -> None:
        """Measure the model at the trainer's current step (once per step) within budget."""
        from nnobs.models.hf import hf_adapter

        step = int(state.global_step)
        if model is None or step in self.live.observer.records:
            return
        if self._t0 is None:
            self._t0 = time.perf_counter()
        with Measuring(model):
            provenance = {
                "path": str(args.output_dir),
                "step": step,
                "corpus_fingerprint": self.fingerprint,
            }
            adapter = hf_adapter(model, self.tokenizer, provenance)
            curve = hf_loss_curve(state.log_history)
            val = {r["step"]: r["val_loss"] for r in curve if r.get("val_loss") is not None}
            meta = {"tokens_seen": None, "val_loss": val.get(step)}
            elapsed = time.perf_counter() - self._t0 - self.live.spent
            self.live.checkpoint(
                adapter, step, int(state.max_steps), max(elapsed, 1e-9), meta, curve
            )


def hf_loss_curve(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Training and evaluation loss per step from a Trainer's ``state.log_history``."""
    by_step: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        row = by_step.setdefault(int(step), {"step": int(step), "loss": None, "val_loss": None})
        if "loss" in entry:
            row["loss"] = entry["loss"]
        if "eval_loss" in entry:
            row["val_loss"] = entry["eval_loss"]
    return [by_step[k] for k in sorted(by_step)]


def _callback_class() -> type:
    from transformers import TrainerCallback

    class HFObservabilityCallback(_HFObserver, TrainerCallback):
        """Live observability for a Hugging Face ``Trainer``: ``callbacks=[HFObservabilityCallback(
        corpus, tokenizer, out_dir)]``.

        Measures at step 0 (``on_train_begin``) and at every save (``on_save``), or, with
        ``steps``, at those global steps (``on_step_end``), within the same time budget as
        :class:`~nnobs.observe.live.ObservabilityCallback`. ``tokenizer`` is an nnobs tokenizer
        or a transformers one. With ``trained_on_corpus`` (the default) the probes use only the
        corpus's validation and test documents, as for a model trained on its training split.
        """

        def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
            self._t0 = time.perf_counter()
            if state.global_step == 0:
                self.observe(args, state, model)

        def on_save(self, args, state, control, model=None, **kwargs) -> None:
            if self.steps is None:
                self.observe(args, state, model)

        def on_step_end(self, args, state, control, model=None, **kwargs) -> None:
            if self.steps is not None and state.global_step in self.steps:
                self.observe(args, state, model)

        def on_train_end(self, args, state, control, model=None, **kwargs) -> None:
            self.live.close()

    return HFObservabilityCallback


def __getattr__(name: str) -> Any:
    if name == "HFObservabilityCallback":
        cls = _callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
