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

TOKENIZER_KINDS = ("bpe", "byte")
MAX_SEED = 2**63 - 1  # torch's generators take seeds below 2**64; numpy's take any
# A checkpoint holds the weights and the optimizer state: more than this many is a mistake.
MAX_CHECKPOINTS = 10_000


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

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return from_fields(cls, data, "train setting")

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    @property
    def order_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed
