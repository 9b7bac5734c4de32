"""Training runs: deterministic, resumable, the same on one process or many.

A run is a :class:`~nnobs.models.config.ModelConfig` plus a
:class:`~nnobs.training.config.TrainConfig`. Its directory (:class:`~nnobs.core.rundir.RunDir`):

.. code-block:: text

    OUT/run.json                  model config, train config, corpus (spec, fingerprint,
                                  source, token counts), tokenizer reference, nnobs version,
                                  parameter count, unigram baseline loss, creation time
    OUT/tokenizer.json            the BPE tokenizer (a byte-tokenizer run needs no file)
    OUT/metrics.jsonl             one JSON object per logged step: step, loss, lm_loss,
                                  aux_loss (with intermediate supervision), val_loss (when
                                  evaluated), lr, tokens_seen, tokens_per_s, elapsed_s
    OUT/checkpoints/step_000512/  model.safetensors, meta.json, optimizer.safetensors +
                                  optimizer.json, rng.safetensors + rng.json
                                  (see :mod:`nnobs.training.checkpoint`)

Steps count optimizer updates: checkpoint ``step_000000`` holds the initial weights and
``step_N`` the weights after N updates. The batch of update ``s`` is a pure function of
``(data_seed, s)`` (:mod:`nnobs.training.schedule`): there is no data-loader state, so a
resumed run sees exactly the batches an uninterrupted one would, and under DDP each rank takes
its contiguous slice of the same global batch (:mod:`nnobs.training.distributed`). On CPU a run
killed at any moment and restarted ends with bit-identical weights.

Losses are in nats per token. The unigram baseline is the cross-entropy on the validation
tokens of the training split's token frequencies (add-one smoothed): a model that does not
beat it has learnt nothing about context.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nnobs.core.errors import NnobsError
from nnobs.core.files import append_jsonl
from nnobs.core.lock import lock_directory
from nnobs.core.rundir import RunDir, list_checkpoints, read_meta
from nnobs.models.config import ModelConfig
from nnobs.training.checkpoint import damaged, save_checkpoint
from nnobs.training.config import TrainConfig
from nnobs.training.distributed import Distributed, init_distributed, pick_device
from nnobs.training.resume import RunResult, RunStart, restore, start_or_resume, truncate_metrics
from nnobs.training.schedule import batch_starts, checkpoint_steps, lr_at
from nnobs.training.sparsity import WeightSparsity
from nnobs.training.tokens import TrainingData, training_data

log = logging.getLogger("nnobs.training")

# Called after each checkpoint is saved: (step, model, checkpoint meta + total_steps).
CheckpointHook = Callable[[int, nn.Module, dict[str, Any]], None]


class StepHook(Protocol):
    """Called after every optimiser step, before that step's checkpoint is saved: where a
    sparsity mask, a weight constraint or a schedule plugs into training.

    ``step`` counts the updates done (1 after the first), as checkpoint steps do, and changes
    the hook makes to the weights are what the next step trains and what the checkpoint holds.
    Under DDP every rank calls it on its own replica, so it must act the same on every rank.
    """

    def on_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None: ...


class ExtraObjective(nn.Module):
    """A training objective around the model's own loss, with trainable parameters of its own
    (an auxiliary head on an activation, say): where an extra loss plugs into training.

    ``forward(model, idx, targets, starts)`` returns the loss to optimise and its logged parts;
    ``starts`` are where the batch's windows begin in the training token stream, for labels
    that follow the stream. Its parameters are trained by the run's optimizer and saved with
    every checkpoint, in ``meta.json`` as exact float lists (so meant for small heads), with
    :meth:`settings`; a run resumes only under equal settings. It must be built the same (same
    seed) in every process of a run.
    """

    def settings(self) -> dict[str, Any]:
        """What the objective computes, as JSON: recorded with each checkpoint."""
        raise NotImplementedError

    def forward(
        self, model: nn.Module, idx: torch.Tensor, targets: torch.Tensor, starts: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def checkpoint_entry(self) -> dict[str, Any]:
        """Settings and parameters as ``meta.json`` holds them (float32 lists are exact)."""
        weights = {k: v.detach().cpu().tolist() for k, v in self.state_dict().items()}
        return {"settings": self.settings(), "weights": weights}

    def restore_entry(self, entry: dict[str, Any], ckpt: Path) -> None:
        """Load what :meth:`checkpoint_entry` saved, bit for bit (settings checked before,
        by :func:`check_extra`)."""
        own = self.state_dict()
        try:
            loaded = {k: torch.tensor(entry["weights"][k], dtype=v.dtype) for k, v in own.items()}
            self.load_state_dict(loaded, strict=True)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise damaged(ckpt, f"its extra objective's weights do not fit ({e})") from e


def normalise_grad_rms_(params: Sequence[nn.Parameter]) -> None:
    """Divide the gradients in place by their root-mean-square over all ``params`` together,
    so it becomes 1 (direction kept)."""
    grads = [p.grad for p in params if p.grad is not None]
    numel = sum(g.numel() for g in grads)
    rms = nn.utils.get_total_norm(grads) / math.sqrt(numel)
    torch._foreach_div_(grads, rms.clamp_min(1e-12))


def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    progress: bool = True,
    overwrite: bool = False,
    on_checkpoint: CheckpointHook | None = None,
    hooks: Sequence[StepHook] = (),
    extra: ExtraObjective | None = None,
) -> RunResult:
    """Train (or resume, or confirm finished) the run in ``out_dir``; see the module doc.

    ``on_checkpoint(step, model, meta)`` is called on the main process right after each
    checkpoint is saved, with the model in training mode and ``meta`` the checkpoint's
    metadata plus ``total_steps`` (live observability, :mod:`nnobs.observe.live`, hooks in here).
    Each of ``hooks`` has its ``on_step(model, optimizer, step)`` called after every optimiser
    step (:class:`StepHook`), after the weight sparsity the train config asks for (if any,
    :class:`~nnobs.training.sparsity.WeightSparsity`). ``extra`` replaces the model's loss
    by an objective with its own trained and checkpointed parameters
    (:class:`ExtraObjective`). The main process holds ``out``'s lock
    (:func:`~nnobs.core.lock.lock_directory`) throughout: a second trainer there is refused.
    """
    mc, tc, out = model_config, train_config, Path(out_dir)
    if tc.seq_len > mc.max_seq_len:
        raise NnobsError(
            f"train.seq_len={tc.seq_len} exceeds model.max_seq_len={mc.max_seq_len}: "
            "raise max_seq_len or shorten seq_len"
        )
    device = pick_device(tc.device)
    dd = init_distributed(device.type)
    try:
        device = dd.place(device, tc.batch_size)
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        with contextlib.ExitStack() as held:
            if dd.main:  # one writer per run directory, taken before anything is written
                held.enter_context(lock_directory(out, "run directory"))
            start = start_or_resume(out, mc, tc, dd, overwrite)
            if isinstance(start, RunResult):
                return start
            state = _build(mc, tc, out, device, dd, start, extra)
            sparsity = WeightSparsity.from_config(tc)
            hooks = [sparsity, *hooks] if sparsity is not None else hooks
            return _Loop(state, tc, out, dd, on_checkpoint, hooks).run(progress)
    finally:
        dd.close()


# ---------------------------------------------------------------------------------- build


def check_extra(meta: dict[str, Any], extra: ExtraObjective | None, ckpt: Path) -> None:
    """Refuse to resume a checkpoint trained with another extra objective (or with one when
    none is given, or none when one is)."""
    entry = meta.get("extra_objective")
    saved = entry.get("settings") if isinstance(entry, dict) else entry
    wanted = extra.settings() if extra is not None else None
    if saved != wanted:
        raise NnobsError(
            f"checkpoint {str(ckpt)!r} was trained with extra objective {saved!r}, not "
            f"{wanted!r}: resume with the same settings or use a new --out"
        )


@dataclass
class _State:
    """What the loop trains and where it stands."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    extra: ExtraObjective | None
    data: TrainingData
    device: torch.device
    run: dict[str, Any]
    meta_base: dict[str, Any]  # what every checkpoint of the run records
    step: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0  # training seconds of earlier processes of the run
    resumed_from: int | None = None


def _build(
    mc: ModelConfig,
    tc: TrainConfig,
    out: Path,
    device: torch.device,
    dd: Distributed,
    start: RunStart,
    extra: ExtraObjective | None = None,
) -> _State:
    """Model, optimizer and data on ``device``, restored from the checkpoint a resumed run
    starts from."""
    from nnobs.models.transformer import Transformer

    data = training_data(start.streams, tc, device)
    # Initialised on the CPU from the run's seed: the same weights on every device.
    model = Transformer(mc, generator=torch.Generator().manual_seed(tc.seed))
    model.to(device)
    meta_base = {
        "tokenizer": start.run.get("tokenizer"),
        "corpus": {"spec": tc.corpus, "fingerprint": start.streams.corpus.fingerprint},
        "seed": tc.seed,
    }
    if extra is not None:
        extra.to(device)
    optimizer = build_optimizer(model, tc, device, extra)
    state = _State(model, optimizer, extra, data, device, start.run, meta_base)
    if start.checkpoint is not None:
        step, path = start.checkpoint
        check_extra(read_meta(path), extra, path)  # before the optimizer state is read
        meta = restore(path, model, state.optimizer)
        if extra is not None:
            extra.restore_entry(meta["extra_objective"], path)
            extra.to(device)
        state.step, state.tokens_seen, state.resumed_from = step, meta["tokens_seen"], step
        state.elapsed = meta.get("elapsed_s", 0.0)
        if dd.main:
            log.info(f"resuming {out} from step {step}")
    if dd.main:
        truncate_metrics(out, state.step if start.checkpoint else -1)
    return state


def build_optimizer(
    model: nn.Module,
    cfg: TrainConfig,
    device: torch.device,
    extra: ExtraObjective | None = None,
) -> torch.optim.AdamW:
    """The run's AdamW: weight decay on matrices, not on norms, biases or embeddings; the
    extra objective's parameters (if any) come after the model's."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    extra_params = list(extra.parameters()) if extra is not None else []
    for p in [*model.parameters(), *extra_params]:
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, fused=fused or None
    )


class _Objective(nn.Module):
    """The model's training loss as ``forward``, so DDP hooks the pass that is trained."""

    def __init__(self, model: nn.Module, extra: ExtraObjective | None) -> None:
        super().__init__()
        self.model, self.extra = model, extra

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor, starts: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.extra is None:
            return self.model.training_loss(idx, targets)
        return self.extra(self.model, idx, targets, starts)


# ----------------------------------------------------------------------------------- loop


class _Loop:
    """The optimiser steps from where the run stands to its last step: logging, evaluation,
    checkpoints and hooks."""

    def __init__(
        self,
        state: _State,
        tc: TrainConfig,
        out: Path,
        dd: Distributed,
        on_checkpoint: CheckpointHook | None,
        hooks: Sequence[StepHook],
    ) -> None:
        self.state, self.tc, self.out, self.dd = state, tc, out, dd
        self.on_checkpoint, self.hooks = on_checkpoint, list(hooks)
        self.autocast = (
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
            if state.device.type == "cuda" and tc.bf16
            else contextlib.nullcontext
        )
        self.saves = set(checkpoint_steps(tc.steps, tc.first_checkpoint, tc.checkpoint_every))
        self.val_loss: float | None = None
        self.objective = dd.wrap(_Objective(state.model, state.extra), state.device)
        self.rows = dd.slice(tc.batch_size)
        self.offsets = torch.arange(tc.seq_len + 1, device=state.device)
        extra_params = list(state.extra.parameters()) if state.extra is not None else []
        self.params = [*state.model.parameters(), *extra_params]
        # A cap on the gradients' root-mean-square is a cap on their norm of rms * sqrt(n).
        self.rms_to_norm = math.sqrt(sum(p.numel() for p in self.params))
        self.t0 = 0.0  # when this process started training

    def run(self, progress: bool) -> RunResult:
        from tqdm import tqdm

        s, tc, dd = self.state, self.tc, self.dd
        self.t0 = time.perf_counter()
        if s.step == 0:
            self.log_and_save(0, {"step": 0, "lr": lr_at(0, tc), "tokens_seen": 0}, evaluate=True)
        tokens_per_step = tc.batch_size * tc.seq_len
        sums: dict[str, torch.Tensor] = {}
        n_summed, interval_start = 0, time.perf_counter()
        bar = tqdm(
            total=tc.steps,
            initial=s.step,
            unit="step",
            disable=not (progress and dd.main and sys.stderr.isatty()),
            dynamic_ncols=True,
        )
        s.model.train()
        for step in range(s.step, tc.steps):
            lr, losses = self.update(step)
            done = step + 1
            for hook in self.hooks:
                hook.on_step(s.model, s.optimizer, done)
            for key, value in losses.items():
                sums[key] = sums[key] + value.detach() if key in sums else value.detach()
            n_summed += 1
            s.tokens_seen += tokens_per_step
            bar.update()
            evaluate = done in self.saves or done % tc.eval_every == 0
            if not (evaluate or done % tc.log_every == 0):
                continue
            record = {"step": done, **self.mean_losses(sums, n_summed)}
            speed = round(n_summed * tokens_per_step / (time.perf_counter() - interval_start))
            record.update(lr=lr, tokens_seen=s.tokens_seen, tokens_per_s=speed)
            sums, n_summed = {}, 0
            self.log_and_save(done, record, evaluate)
            if dd.main:
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=record["tokens_per_s"])
            interval_start = time.perf_counter()  # evaluation and saving are not counted
        bar.close()
        dd.barrier()
        return RunResult(
            out_dir=self.out,
            step=tc.steps,
            val_loss=self.val_loss,
            unigram_loss=s.run["unigram_baseline_loss"],
            tokens_seen=s.tokens_seen,
            elapsed_s=s.elapsed + time.perf_counter() - self.t0,
            resumed_from=s.resumed_from,
        )

    def update(self, step: int) -> tuple[float, dict[str, torch.Tensor]]:
        """One optimiser step on the batch of update ``step``: its learning rate and losses."""
        s, tc = self.state, self.tc
        lo, hi = self.rows
        starts = batch_starts(tc.order_seed, step, s.data.n_train, tc.seq_len, tc.batch_size)
        index = torch.from_numpy(starts[lo:hi]).to(s.device, non_blocking=True)[:, None]
        window = s.data.train[index + self.offsets].long()
        lr = lr_at(step, tc)
        for group in s.optimizer.param_groups:
            group["lr"] = lr
        with self.autocast():
            loss, parts = self.objective(window[:, :-1], window[:, 1:], index[:, 0])
        loss.backward()
        if tc.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.params, tc.grad_clip)
        if tc.grad_rms_normalise:
            normalise_grad_rms_(self.params)
        if tc.grad_rms_clip > 0:
            nn.utils.clip_grad_norm_(self.params, tc.grad_rms_clip * self.rms_to_norm)
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
        return lr, {"loss": loss, **parts}

    def mean_losses(self, sums: dict[str, torch.Tensor], n: int) -> dict[str, float]:
        """Each loss averaged over the interval's steps and the ranks, rounded for the log."""
        keys = list(sums)
        means = torch.stack([sums[k] for k in keys]).float() / n
        self.dd.mean(means)
        values = means.tolist()  # the one host sync per logging interval
        return {k: round(v, 6) for k, v in zip(keys, values, strict=True)}

    def log_and_save(self, step: int, record: dict[str, Any], evaluate: bool) -> None:
        """Evaluate if due, log the record, then save if due (a checkpoint never lacks the
        metrics before it, so resuming from it loses no record)."""
        s = self.state
        if evaluate:
            self.val_loss = _evaluate(s.model, s.data, self.tc, self.dd, self.autocast)
            record["val_loss"] = self.val_loss
        self.stop_if_diverged(step, record)
        record["elapsed_s"] = round(s.elapsed + time.perf_counter() - self.t0, 3)
        if not self.dd.main:
            return
        append_jsonl(RunDir(self.out).metrics_file, record)
        if step not in self.saves:
            return
        meta = {
            **s.meta_base,
            "tokens_seen": s.tokens_seen,
            "val_loss": self.val_loss,
            "elapsed_s": record["elapsed_s"],
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if s.extra is not None:
            meta["extra_objective"] = s.extra.checkpoint_entry()
        save_checkpoint(self.out, step, s.model, meta, s.optimizer)
        if self.on_checkpoint is not None:
            self.on_checkpoint(step, s.model, {**meta, "step": step, "total_steps": self.tc.steps})

    def stop_if_diverged(self, step: int, record: dict[str, Any]) -> None:
        """Stop at a loss that is no longer finite, before it is logged or saved: every
        checkpoint on disk then holds finite weights. A checkpoint step always evaluates, so
        weights broken by the step just before it show in the validation loss."""
        broken = [k for k in ("loss", "val_loss") if k in record and not math.isfinite(record[k])]
        if not broken:
            return
        kept = list_checkpoints(self.out)
        last = f"the checkpoints up to step {kept[-1][0]} are kept" if kept else "none was saved"
        raise NnobsError(
            f"training diverged at step {step}: {broken[0]} is {record[broken[0]]}; {last}. "
            f"Lower train.lr (now {self.tc.lr:g}) or raise train.warmup_steps, then re-run with "
            "--overwrite or a new --out"
        )


def _evaluate(
    model: nn.Module, data: TrainingData, cfg: TrainConfig, dd: Distributed, autocast
) -> float:
    """Mean next-token loss over the fixed validation windows (all ranks together)."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=data.val_windows.device)
    lo, hi = dd.slice(cfg.batch_size)
    with torch.no_grad(), autocast():
        for b in range(0, len(data.val_windows), cfg.batch_size):
            window = data.val_windows[b + lo : b + hi]
            logits = model(window[:, :-1])
            loss = F.cross_entropy(
                logits.flatten(0, 1).float(), window[:, 1:].flatten(), reduction="sum"
            )
            total += loss.double()
    dd.sum(total)
    model.train()
    return total.item() / (len(data.val_windows) * cfg.seq_len)
