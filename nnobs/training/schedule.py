"""What happens at each step of a run: the learning rate, the batches and the checkpoints.

Each is a pure function of the step (and the config), so a resumed run repeats exactly what
an uninterrupted one would have done.
"""

from __future__ import annotations

import math

import numpy as np

from nnobs.training.config import TrainConfig


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
    """Linear warmup to ``lr``, then cosine (or linear, ``lr_schedule``) decay to
    ``lr * min_lr_ratio`` at the last step; with ``lr_keep_scaling`` all of it times
    1/sqrt(the kept fraction the weights hold when update ``step`` starts)."""
    scale = 1 / math.sqrt(kept_fraction_at(step, cfg)) if cfg.lr_keep_scaling else 1.0
    if step < cfg.warmup_steps:
        return scale * cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.lr_schedule == "linear":
        return scale * (cfg.lr - (cfg.lr - floor) * progress)
    return scale * (floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress)))


def kept_fraction_at(step: int, cfg: TrainConfig) -> float:
    """The fraction of each weight matrix kept once ``step`` updates are done: 1 until the
    fraction ``keep_anneal[0]`` of training, then falling linearly to ``weight_keep`` at
    ``keep_anneal[1]``, and ``weight_keep`` from there on."""
    begin, end = (f * cfg.steps for f in cfg.keep_anneal)
    if step <= begin:
        return 1.0
    if step >= end:
        return cfg.weight_keep
    return 1.0 + (cfg.weight_keep - 1.0) * (step - begin) / (end - begin)


def batch_starts(seed: int, step: int, n_tokens: int, seq_len: int, batch_size: int) -> np.ndarray:
    """Window start offsets of the global batch of update ``step``: a pure function."""
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, n_tokens - seq_len, size=batch_size)


def eval_starts(n_tokens: int, seq_len: int, n_windows: int) -> np.ndarray:
    """Evenly spaced validation windows: fixed, and the same for every seed and run."""
    return np.linspace(0, n_tokens - seq_len - 1, n_windows).astype(np.int64)
