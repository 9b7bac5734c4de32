"""Training runs: deterministic, resumable, the same on one process or many.

A run is a :class:`~nnobs.models.config.ModelConfig` plus a :class:`TrainConfig`. Its directory:

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
``(data_seed, s)``: there is no data-loader state, so a resumed run sees exactly the batches
an uninterrupted one would, and under DDP each rank takes its contiguous slice of the same
global batch, so the data is identical to a single process. On CPU a run killed at any
moment and restarted ends with bit-identical weights.

Losses are in nats per token. The unigram baseline is the cross-entropy on the validation
tokens of the training split's token frequencies (add-one smoothed): a model that does not
beat it has learnt nothing about context.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nnobs.core.errors import NnobsError
from nnobs.core.files import append_jsonl, write_json, write_text
from nnobs.core.rundir import RUN_FORMAT, RunDir, list_checkpoints, read_meta, read_metrics
from nnobs.core.version import __version__
from nnobs.models.checkpoint import load_run_tokenizer, load_weights
from nnobs.models.config import ModelConfig
from nnobs.models.sizing import count_params
from nnobs.training.checkpoint import load_training_state, remove_partial, save_checkpoint

log = logging.getLogger("nnobs.training")

TOKENIZER_KINDS = ("bpe", "byte")
# Fields that do not change what a run computes: a run may resume with them changed.
_RESUMABLE_CHANGES = frozenset({"device"})


@dataclass
class TrainConfig:
    """How a model is trained. Losses are per token; ``batch_size`` is global, in sequences.

    The tokenizer's vocabulary target is the model's ``vocab_size`` (BPE is trained to it;
    the byte tokenizer has 257 tokens); the model's vocabulary must hold the tokenizer's.
    The learning rate warms up linearly over ``warmup_steps`` and then follows a cosine to
    ``lr * min_lr_ratio`` at the last step. Weight decay applies to matrices only, not to
    norms, biases or embeddings (decay would pull the rows of rare tokens to zero).
    ``grad_clip`` is the global gradient norm cap (0 turns it off). ``data_seed`` (default:
    ``seed``) fixes the data order on its own, so several initialisation seeds can share it.
    Checkpoints are saved at 0, ``first_checkpoint`` and its doublings below
    ``checkpoint_every``, then every ``checkpoint_every`` steps, and at the last step.
    """

    corpus: str = "stdlib"
    max_chars: int | None = None
    tokenizer: str = "bpe"
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    data_seed: int | None = None
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    first_checkpoint: int = 16
    checkpoint_every: int = 1024
    device: str = "auto"
    bf16: bool = True  # bf16 autocast on CUDA; CPU always trains in float32

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        for name in ("warmup_steps", "seed"):
            _check_int(name, getattr(self, name), 0)
        for name in (
            *("seq_len", "batch_size", "steps", "eval_every", "eval_batches", "log_every"),
            *("first_checkpoint", "checkpoint_every"),
        ):
            _check_int(name, getattr(self, name), 1)
        for name in ("max_chars", "data_seed"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1 if name == "max_chars" else 0)
        for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise NnobsError(f"train.{name} must be a number >= 0, got {value!r}")
        if self.lr == 0 or self.min_lr_ratio > 1:
            raise NnobsError(
                f"train.lr must be > 0 and train.min_lr_ratio at most 1, got lr={self.lr}, "
                f"min_lr_ratio={self.min_lr_ratio}"
            )
        if not (
            isinstance(self.betas, tuple)
            and len(self.betas) == 2
            and all(isinstance(b, int | float) and 0 <= b < 1 for b in self.betas)
        ):
            raise NnobsError(f"train.betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.tokenizer not in TOKENIZER_KINDS:
            raise NnobsError(
                f"unknown tokenizer {self.tokenizer!r}: choose one of {', '.join(TOKENIZER_KINDS)}"
            )
        if not isinstance(self.corpus, str) or not self.corpus:
            raise NnobsError(f"train.corpus must be a corpus spec string, got {self.corpus!r}")
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu") or self.device.split(":")[0] == "cuda"
        ):
            raise NnobsError(f"train.device must be auto, cpu or cuda, got {self.device!r}")
        if not isinstance(self.bf16, bool):
            raise NnobsError(f"train.bf16 must be true or false, got {self.bf16!r}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise NnobsError(
                f"unknown train setting(s) {', '.join(unknown)}: "
                f"known settings are {', '.join(sorted(known))}"
            )
        return cls(**data)

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    @property
    def order_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise NnobsError(f"train.{name} must be an integer >= {low}, got {value!r}")


# Called after each checkpoint is saved: (step, model, checkpoint meta + total_steps).
CheckpointHook = Callable[[int, nn.Module, dict[str, Any]], None]


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


# ------------------------------------------------------------------------------ schedules


def checkpoint_steps(total_steps: int, first: int = 16, linear_every: int = 1024) -> list[int]:
    """Steps to save: 0, ``first`` doubling while below ``linear_every``, then every
    ``linear_every`` steps, and always ``total_steps``. Log-spaced early, where the model
    changes fastest; linear late."""
    steps = {0, total_steps}
    s = first
    while s < linear_every and s <= total_steps:
        steps.add(s)
        s *= 2
    steps.update(range(linear_every, total_steps + 1, linear_every))
    return sorted(steps)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def batch_starts(seed: int, step: int, n_tokens: int, seq_len: int, batch_size: int) -> np.ndarray:
    """Window start offsets of the global batch of update ``step``: a pure function."""
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, n_tokens - seq_len, size=batch_size)


def eval_starts(n_tokens: int, seq_len: int, n_windows: int) -> np.ndarray:
    """Evenly spaced validation windows: fixed, and the same for every seed and run."""
    return np.linspace(0, n_tokens - seq_len - 1, n_windows).astype(np.int64)


def unigram_loss(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats) on ``val_tokens`` of add-one smoothed training token frequencies."""
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts) - np.log(counts.sum())
    return float(-log_p[val_tokens].mean())


# ------------------------------------------------------------------------------- run dir


def _truncate_metrics(out: Path, step: int) -> None:
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


def _prepare_out(out: Path, mc: ModelConfig, tc: TrainConfig, overwrite: bool) -> dict | None:
    """Check OUT can hold this run; return its run.json if it already holds it."""
    if out.exists() and not out.is_dir():
        raise NnobsError(f"--out {str(out)!r} is a file: give a directory")
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
    for what, stored, requested, skip in (
        ("model config", run.get("model_config", {}), mc.to_dict(), frozenset()),
        ("train config", run.get("train_config", {}), tc.to_dict(), _RESUMABLE_CHANGES),
    ):
        diff = _config_diff(stored, requested, skip)
        if diff:
            raise NnobsError(
                f"{str(out)!r} holds a different run ({what} differs: {diff}); "
                "use a new --out or --overwrite"
            )
    return run


def _clear_run(out: Path) -> None:
    """Delete the run and the results computed from it (they describe the old weights)."""
    for name in RunDir.ENTRIES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


# -------------------------------------------------------------------------------- pieces


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _init_distributed(device_kind: str) -> _Dist:
    """Join the process group torchrun describes in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return _Dist()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return _Dist(rank, world, local, owns)


def _pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise NnobsError("train.device is cuda but no CUDA device is available: use auto or cpu")
    return name


def _optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)


class _Objective(nn.Module):
    """The model's training loss as ``forward``, so DDP hooks the pass that is trained."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor):
        return self.model.training_loss(idx, targets)


@dataclass
class _Data:
    train: torch.Tensor  # token stream on the training device
    val_windows: torch.Tensor  # (n, seq_len + 1) fixed validation windows
    n_train: int


def _load_data(tc: TrainConfig, mc: ModelConfig, tokenizer_ref: dict | None, run_dir: Path):
    """Corpus, tokenizer, token streams and the unigram baseline."""
    from nnobs.data.corpus import load_corpus
    from nnobs.data.encoding import token_stream
    from nnobs.data.tokenizer import get_tokenizer

    corpus = load_corpus(tc.corpus, max_chars=tc.max_chars)
    if tokenizer_ref is not None:  # resuming: the run's own tokenizer, not a rebuilt one
        tokenizer = load_run_tokenizer(RunDir(run_dir), tokenizer_ref)
    else:
        tokenizer = get_tokenizer(tc.tokenizer, corpus, mc.vocab_size)
    if tokenizer.vocab_size > mc.vocab_size:
        raise NnobsError(
            f"the {tokenizer.kind} tokenizer has {tokenizer.vocab_size} tokens but "
            f"model.vocab_size is {mc.vocab_size}: set model.vocab_size={tokenizer.vocab_size}"
        )
    train_ids = token_stream(corpus.train, tokenizer)
    val_ids = token_stream(corpus.validation, tokenizer)
    for split, ids in (("training", train_ids), ("validation", val_ids)):
        if len(ids) < tc.seq_len + 2:
            raise NnobsError(
                f"the {split} split of corpus {tc.corpus!r} has {len(ids)} tokens, fewer than "
                f"one window of seq_len={tc.seq_len}: use a larger corpus or max_chars, or a "
                "smaller seq_len"
            )
    return corpus, tokenizer, train_ids, val_ids


def _evaluate(model: nn.Module, data: _Data, cfg: TrainConfig, dd: _Dist, autocast) -> float:
    """Mean next-token loss over the fixed validation windows (all ranks together)."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=data.val_windows.device)
    per_rank = cfg.batch_size // dd.world
    with torch.no_grad(), autocast():
        for b in range(0, len(data.val_windows), cfg.batch_size):
            lo = b + dd.rank * per_rank
            window = data.val_windows[lo : lo + per_rank]
            logits = model(window[:, :-1])
            loss = F.cross_entropy(
                logits.flatten(0, 1).float(), window[:, 1:].flatten(), reduction="sum"
            )
            total += loss.double()
    if dd.world > 1:
        dist.all_reduce(total)
    model.train()
    return total.item() / (len(data.val_windows) * cfg.seq_len)


# ---------------------------------------------------------------------------------- train


def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    progress: bool = True,
    overwrite: bool = False,
    on_checkpoint: CheckpointHook | None = None,
) -> RunResult:
    """Train (or resume, or confirm finished) the run in ``out_dir``; see the module doc.

    ``on_checkpoint(step, model, meta)`` is called on the main process right after each
    checkpoint is saved, with the model in training mode and ``meta`` the checkpoint's
    metadata plus ``total_steps`` (live observability, :mod:`nnobs.observe.live`, hooks in here).
    """
    mc, tc, out = model_config, train_config, Path(out_dir)
    if tc.seq_len > mc.max_seq_len:
        raise NnobsError(
            f"train.seq_len={tc.seq_len} exceeds model.max_seq_len={mc.max_seq_len}: "
            "raise max_seq_len or shorten seq_len"
        )
    device = torch.device(_pick_device(tc.device))
    dd = _init_distributed(device.type)
    try:
        if dd.world > 1:
            if tc.batch_size % dd.world:
                raise NnobsError(
                    f"train.batch_size={tc.batch_size} does not split evenly over {dd.world} "
                    "processes: use a multiple of the process count"
                )
            if device.type == "cuda":
                device = torch.device("cuda", dd.local_rank)
                torch.cuda.set_device(device)
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        return _run(mc, tc, out, device, dd, progress, overwrite, on_checkpoint)
    finally:
        if dd.owns_group:
            dist.destroy_process_group()


def _run(
    mc: ModelConfig,
    tc: TrainConfig,
    out: Path,
    device: torch.device,
    dd: _Dist,
    progress: bool,
    overwrite: bool,
    on_checkpoint: CheckpointHook | None = None,
) -> RunResult:
    from tqdm import tqdm

    if overwrite and dd.main and out.exists():
        _prepare_out(out, mc, tc, overwrite=True)  # refuses directories that are not runs
        _clear_run(out)
    dd.barrier()
    run = _prepare_out(out, mc, tc, overwrite=False)
    found = list_checkpoints(out) if run else []
    if found and found[-1][0] >= tc.steps:
        step, path = found[-1]
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

    # Rank 0 builds the tokenizer and token caches first; the others then read them.
    if not dd.main:
        dd.barrier()
    corpus, tokenizer, train_ids, val_ids = _load_data(
        tc, mc, run["tokenizer"] if run else None, out
    )
    if dd.main:
        dd.barrier()
    if run and run["corpus"]["fingerprint"] != corpus.fingerprint:
        raise NnobsError(
            f"corpus {tc.corpus!r} changed since the run in {str(out)!r} started (fingerprint "
            f"{corpus.fingerprint} vs {run['corpus']['fingerprint']}): use a new --out"
        )
    if run is None:
        baseline = unigram_loss(train_ids, val_ids, mc.vocab_size)
        if dd.main:
            out.mkdir(parents=True, exist_ok=True)
            run = _write_run(out, mc, tc, corpus, tokenizer, train_ids, val_ids, baseline)
        else:
            run = {"unigram_baseline_loss": baseline}
    if dd.main:
        remove_partial(out)

    n_val = tc.eval_batches * tc.batch_size
    offsets = np.arange(tc.seq_len + 1)
    val_windows = val_ids[eval_starts(len(val_ids), tc.seq_len, n_val)[:, None] + offsets]
    data = _Data(
        train=torch.from_numpy(train_ids).to(device),
        val_windows=torch.from_numpy(val_windows).to(device=device, dtype=torch.long),
        n_train=len(train_ids),
    )

    from nnobs.models.transformer import Transformer

    torch.manual_seed(tc.seed)  # initialise on the CPU: the same weights on every device
    model = Transformer(mc)
    model.to(device)
    optimizer = _optimizer(model, tc, device)
    start, tokens_seen, elapsed, resumed = 0, 0, 0.0, None
    if found:
        resumed, path = found[-1]
        meta = read_meta(path)
        load_weights(model, path)
        load_training_state(path, optimizer)
        start, tokens_seen, elapsed = resumed, meta["tokens_seen"], meta.get("elapsed_s", 0.0)
        if dd.main:
            log.info(f"resuming {out} from step {start}")
    if dd.main:
        _truncate_metrics(out, start if found else -1)

    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if device.type == "cuda" and tc.bf16
        else contextlib.nullcontext
    )
    saves = set(checkpoint_steps(tc.steps, tc.first_checkpoint, tc.checkpoint_every))
    meta_base = {
        "tokenizer": run.get("tokenizer"),
        "corpus": {"spec": tc.corpus, "fingerprint": corpus.fingerprint},
        "seed": tc.seed,
    }
    val_loss: float | None = None

    def log_and_save(step: int, record: dict, evaluate: bool) -> None:
        """Evaluate if due, log the record, then save if due (a checkpoint never lacks the
        metrics before it, so resuming from it loses no record)."""
        nonlocal val_loss
        if evaluate:
            val_loss = _evaluate(model, data, tc, dd, autocast)
            record["val_loss"] = val_loss
        record["elapsed_s"] = round(elapsed + time.perf_counter() - t0, 3)
        if not dd.main:
            return
        append_jsonl(RunDir(out).metrics_file, record)
        if step in saves:
            meta = {
                **meta_base,
                "tokens_seen": tokens_seen,
                "val_loss": val_loss,
                "elapsed_s": record["elapsed_s"],
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            save_checkpoint(out, step, model, meta, optimizer)
            if on_checkpoint is not None:
                on_checkpoint(step, model, {**meta, "step": step, "total_steps": tc.steps})

    objective = _Objective(model)
    if dd.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        objective = nn.parallel.DistributedDataParallel(objective, device_ids=ids)
    t0 = time.perf_counter()
    if start == 0:
        log_and_save(0, {"step": 0, "lr": lr_at(0, tc), "tokens_seen": 0}, evaluate=True)

    per_rank = tc.batch_size // dd.world
    lo, hi = dd.rank * per_rank, (dd.rank + 1) * per_rank
    offsets_t = torch.arange(tc.seq_len + 1, device=device)
    tokens_per_step = tc.batch_size * tc.seq_len
    params = list(model.parameters())
    sums: dict[str, torch.Tensor] = {}
    n_summed, interval_start = 0, time.perf_counter()
    bar = tqdm(
        total=tc.steps,
        initial=start,
        unit="step",
        disable=not (progress and dd.main and sys.stderr.isatty()),
        dynamic_ncols=True,
    )
    model.train()
    for step in range(start, tc.steps):
        starts = batch_starts(tc.order_seed, step, data.n_train, tc.seq_len, tc.batch_size)
        index = torch.from_numpy(starts[lo:hi]).to(device, non_blocking=True)[:, None] + offsets_t
        window = data.train[index].long()
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast():
            loss, parts = objective(window[:, :-1], window[:, 1:])
        loss.backward()
        if tc.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for key, value in {"loss": loss, **parts}.items():
            sums[key] = sums[key] + value.detach() if key in sums else value.detach()
        n_summed += 1
        tokens_seen += tokens_per_step
        done = step + 1
        bar.update()
        evaluate = done in saves or done % tc.eval_every == 0
        if not (evaluate or done % tc.log_every == 0):
            continue
        keys = list(sums)
        means = torch.stack([sums[k] for k in keys]).float() / n_summed
        if dd.world > 1:
            dist.all_reduce(means)
            means /= dd.world
        values = means.tolist()  # the one host sync per logging interval
        interval = time.perf_counter() - interval_start
        record = {"step": done, **{k: round(v, 6) for k, v in zip(keys, values, strict=True)}}
        speed = round(n_summed * tokens_per_step / interval)
        record.update(lr=lr, tokens_seen=tokens_seen, tokens_per_s=speed)
        sums, n_summed = {}, 0
        log_and_save(done, record, evaluate)
        if dd.main:
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=record["tokens_per_s"])
        interval_start = time.perf_counter()  # evaluation and saving are not counted
    bar.close()
    dd.barrier()
    total = elapsed + time.perf_counter() - t0
    return RunResult(
        out, tc.steps, val_loss, run["unigram_baseline_loss"], tokens_seen, total, resumed
    )


def _write_run(out, mc, tc, corpus, tokenizer, train_ids, val_ids, baseline) -> dict:
    tokenizer_ref = tokenizer.save(out)
    run = {
        "format": RUN_FORMAT,
        "nnobs_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model_config": mc.to_dict(),
        "model_config_hash": mc.hash,
        "train_config": tc.to_dict(),
        "corpus": {
            "spec": tc.corpus,
            "fingerprint": corpus.fingerprint,
            "source": corpus.source,
            "tokens": {"train": int(len(train_ids)), "validation": int(len(val_ids))},
        },
        "tokenizer": tokenizer_ref,
        "n_params": count_params(mc),
        "unigram_baseline_loss": baseline,
    }
    RunDir(out).metrics_file.unlink(missing_ok=True)
    write_json(RunDir(out).run_file, run)
    return run
