"""The task loss of circuit pruning: binary cross-entropy over the two answer logits.

For an item with correct answer ``c`` and incorrect answer ``i``, the loss at the prompt's
last position is ``-log(exp(l_c) / (exp(l_c) + exp(l_i))) = softplus(-(l_c - l_i))`` in
nats: log 2 at chance (equal logits), 0 for a certain right answer. Only the ``clean``
prompts are scored (each item's counterpart prompt is an item of its own elsewhere in the
task, with the answers swapped).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from nnobs.data.tasks import EncodedTask
from nnobs.interventions.patching import logit_diffs
from nnobs.models.adapter import ModelAdapter


def binary_task_loss(diffs: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy (nats) of logit differences ``l_correct - l_incorrect``;
    differentiable, for training masks against it."""
    return F.softplus(-diffs.float()).mean()


def item_losses(adapter: ModelAdapter, task: EncodedTask) -> np.ndarray:
    """Each item's binary cross-entropy (nats) at its clean prompt's last position."""
    return np.logaddexp(0.0, -logit_diffs(adapter, task, "clean"))


def task_loss(adapter: ModelAdapter, task: EncodedTask) -> float:
    """The task loss of ``adapter`` on ``task``: the mean of :func:`item_losses`."""
    return float(item_losses(adapter, task).mean())
