"""How a model is trained: :class:`TrainConfig`, its settings and their validation."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from nnobs.core.errors import NnobsError
from nnobs.core.fields import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    from_fields,
    is_number,
)

TOKENIZER_KINDS = ("bpe", "bpe_tasks", "byte")
LR_SCHEDULES = ("cosine", "linear")
MAX_SEED = 2**63 - 1  # torch's generators take seeds below 2**64; numpy's take any
# A checkpoint holds the weights and the optimizer state: more than this many is a mistake.
MAX_CHECKPOINTS = 10_000
# Settings added later, with their defaults: left out of ``to_dict`` while at the default, so
# the stored train config of a run that predates them still matches (and resumes).
LATER_SETTINGS: dict[str, Any] = {
    "weight_keep": 1.0,
    "sparse_biases": False,
    "min_nonzero": 0,
    "keep_anneal": (0.01, 0.5),
    "adam_eps": 1e-8,
    "grad_rms_clip": 0.0,
    "grad_rms_normalise": False,
    "lr_schedule": "cosine",
    "lr_keep_scaling": False,
}


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

    Weight sparsity (:mod:`nnobs.training.sparsity`): ``weight_keep`` below 1 keeps only that
    fraction of the entries of every weight matrix (embeddings and unembedding included, and
    each Linear bias with ``sparse_biases``) after every optimiser step, the largest by
    magnitude, with every row and column holding at least ``min_nonzero`` of them; the kept
    fraction falls linearly from 1 to ``weight_keep`` between the fractions ``keep_anneal`` of
    training. ``lr_keep_scaling`` multiplies the learning rate by 1/sqrt(kept fraction);
    ``lr_schedule="linear"`` decays linearly instead of by a cosine; ``grad_rms_normalise``
    divides the gradients by their global root-mean-square before every step (Gao et al.:
    with AdamW's ``adam_eps`` of 0.1 the updates are only Adam-like for gradients of RMS
    about 1; raw gradients are far smaller); ``grad_rms_clip`` caps that RMS (0 turns it
    off); ``adam_eps`` is AdamW's epsilon. Tokenizer ``bpe_tasks`` is BPE in which every
    answer of the Python tasks (:mod:`nnobs.data.python_tasks`) is one token.
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
    weight_keep: float = 1.0
    sparse_biases: bool = False
    min_nonzero: int = 0
    keep_anneal: tuple[float, float] = (0.01, 0.5)
    adam_eps: float = 1e-8
    grad_rms_clip: float = 0.0
    grad_rms_normalise: bool = False
    lr_schedule: str = "cosine"
    lr_keep_scaling: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        if isinstance(self.keep_anneal, list):
            self.keep_anneal = tuple(self.keep_anneal)
        self._check_sparsity()
        for name in ("warmup_steps", "seed"):
            check_int(f"train.{name}", getattr(self, name), 0, MAX_SEED if name == "seed" else None)
        for name in (
            *("seq_len", "batch_size", "steps", "eval_every", "eval_batches", "log_every"),
            *("first_checkpoint", "checkpoint_every"),
        ):
            check_int(f"train.{name}", getattr(self, name), 1)
        if self.max_chars is not None:
            check_int("train.max_chars", self.max_chars, 1)
        if self.data_seed is not None:
            check_int("train.data_seed", self.data_seed, 0, MAX_SEED)
        for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip"):
            check_number(f"train.{name}", getattr(self, name), 0)
        if self.lr == 0 or self.min_lr_ratio > 1:
            raise NnobsError(
                f"train.lr must be > 0 and train.min_lr_ratio at most 1, got lr={self.lr}, "
                f"min_lr_ratio={self.min_lr_ratio}"
            )
        if not (
            isinstance(self.betas, tuple)
            and len(self.betas) == 2
            and all(is_number(b) and 0 <= b < 1 for b in self.betas)
        ):
            raise NnobsError(f"train.betas must be two numbers in [0, 1), got {self.betas!r}")
        check_choice("tokenizer", self.tokenizer, TOKENIZER_KINDS)
        if not isinstance(self.corpus, str) or not self.corpus:
            raise NnobsError(f"train.corpus must be a corpus spec string, got {self.corpus!r}")
        if not isinstance(self.device, str) or not re.fullmatch(
            r"auto|cpu|cuda(:\d+)?", self.device
        ):
            raise NnobsError(
                f"train.device must be auto, cpu or cuda (cuda:N for one GPU), got {self.device!r}"
            )
        check_bool("train.bf16", self.bf16)
        saves = self.steps // self.checkpoint_every
        if saves > MAX_CHECKPOINTS:
            raise NnobsError(
                f"train.steps={self.steps} with train.checkpoint_every={self.checkpoint_every} "
                f"saves {saves} checkpoints, more than {MAX_CHECKPOINTS} (each holds the weights "
                "and the optimizer state): raise checkpoint_every"
            )

    def _check_sparsity(self) -> None:
        """The weight-sparsity and optimiser settings added later (see the class doc)."""
        check_number("train.weight_keep", self.weight_keep, 0, 1, open_low=True)
        check_int("train.min_nonzero", self.min_nonzero, 0)
        check_number("train.adam_eps", self.adam_eps, 0, open_low=True)
        check_number("train.grad_rms_clip", self.grad_rms_clip, 0)
        check_choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        for name in ("sparse_biases", "lr_keep_scaling", "grad_rms_normalise"):
            check_bool(f"train.{name}", getattr(self, name))
        anneal = self.keep_anneal
        if not (
            isinstance(anneal, tuple)
            and len(anneal) == 2
            and all(is_number(a) for a in anneal)
            and 0 <= anneal[0] <= anneal[1] <= 1
        ):
            raise NnobsError(
                "train.keep_anneal must be two fractions of training [start, end] with "
                f"0 <= start <= end <= 1, got {anneal!r}"
            )

    @property
    def sparse(self) -> bool:
        """Whether the weights are made sparse after every step (``min_nonzero`` alone
        keeps everything: a floor only matters below a full matrix)."""
        return self.weight_keep < 1

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        data["keep_anneal"] = list(self.keep_anneal)
        for name, default in LATER_SETTINGS.items():
            if getattr(self, name) == default:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return from_fields(cls, data, "train setting")

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    @property
    def order_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed
