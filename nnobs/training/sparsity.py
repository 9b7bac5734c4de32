"""Weight-sparse training: after every optimiser step, zero all but the largest-magnitude
entries of each weight matrix (Gao et al. 2025, "Weight-sparse transformers have
interpretable circuits").

Every parameter with two or more dimensions is a weight matrix (token and position
embeddings, the unembedding, every projection) and keeps the same fraction of its entries,
the kept fraction of the step (:func:`~nnobs.training.schedule.kept_fraction_at`); with
``sparse_biases`` so does each Linear bias. Norm gains stay dense. With ``min_nonzero = j``
every row and every column of a matrix keeps its ``j`` largest entries whatever their rank in
the whole matrix, so no neuron, attention channel, residual channel or token is left
without weights; those come first and the largest of the rest fill the matrix up to its kept
count. Gradients and the optimiser's moments stay dense: an entry zeroed now can grow back
when its accumulated update beats a kept one.

The mask is a pure function of the weights and the step, so a resumed run repeats it exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from nnobs.training.config import TrainConfig
from nnobs.training.schedule import kept_fraction_at


def kept_count(numel: int, fraction: float) -> int:
    """Entries a tensor of ``numel`` entries keeps at ``fraction``: the nearest whole
    number, and at least one."""
    return max(1, min(numel, round(fraction * numel)))


def sparsified_parameters(model: nn.Module, biases: bool) -> list[tuple[str, nn.Parameter]]:
    """The parameters the sparsity applies to, each once (tied weights are one parameter):
    every matrix, and Linear biases if ``biases``."""
    linear_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.Linear)}
    return [
        (name, p)
        for name, p in model.named_parameters()
        if p.dim() >= 2 or (biases and id(p) in linear_biases)
    ]


def floor_mask(magnitude: torch.Tensor, per_unit: int) -> torch.Tensor:
    """True at each row's and each column's ``per_unit`` largest entries (a 2-D view)."""
    floor = torch.zeros_like(magnitude, dtype=torch.bool)
    for dim in (0, 1):
        j = min(per_unit, magnitude.shape[dim])
        floor.scatter_(dim, magnitude.topk(j, dim=dim).indices, True)
    return floor


@torch.no_grad()
def keep_largest(weight: torch.Tensor, fraction: float, per_unit: int = 0) -> None:
    """Zero all but the ``kept_count`` largest-magnitude entries of ``weight`` in place; with
    ``per_unit`` each row and column (of a matrix) keeps its ``per_unit`` largest first, and
    the matrix then holds the larger of its kept count and that floor."""
    k = kept_count(weight.numel(), fraction)
    if k == weight.numel():
        return  # the floor only ever adds entries
    magnitude = weight.detach().abs().reshape(weight.shape[0], -1)
    if weight.dim() >= 2 and per_unit > 0:
        floor = floor_mask(magnitude, per_unit)
        k = max(k, int(floor.sum()))
        magnitude = magnitude.masked_fill(floor, float("inf"))
    if k >= weight.numel():
        return
    mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
    mask[magnitude.flatten().topk(k, sorted=False).indices] = True
    weight.mul_(mask.view_as(weight))


class WeightSparsity:
    """The step hook (:class:`~nnobs.training.trainer.StepHook`) a sparse run's train config
    describes; :meth:`from_config` gives None for a dense run."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    @classmethod
    def from_config(cls, config: TrainConfig) -> WeightSparsity | None:
        return cls(config) if config.sparse else None

    def on_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        fraction = kept_fraction_at(step, self.config)
        for _, param in sparsified_parameters(model, self.config.sparse_biases):
            per_unit = self.config.min_nonzero if param.dim() >= 2 else 0
            keep_largest(param.data, fraction, per_unit)
