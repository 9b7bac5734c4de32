"""Node masks: one learned τ per node, a hard gate forward and a smooth gradient backward.

Forward a node passes ``x·H(τ)`` (H the Heaviside step: on for τ > 0); backward the gate's
gradient is taken through ``σ(τ/T)`` instead, so ``dH/dτ := σ'(τ/T)/T`` with temperature
``T``. A pruned node is not zeroed but frozen at its mean over the pretraining distribution
(``ablation="mean"``): the gate mixes ``m + H(τ)·(x − m)``; ``ablation="zero"`` uses
``m = 0``. τ is shared across positions and prompts and clamped to [−1, 1] after each step.
The gates reach the model only as adapter edits.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nnobs.circuits.nodes import NodeLocation
from nnobs.core.errors import NnobsError
from nnobs.interventions.ablation import mean_activations
from nnobs.models.adapter import Edit, ModelAdapter

ABLATIONS = ("mean", "zero")
TAU_INIT, TAU_NOISE = 0.1, 0.01


class _SurrogateStep(torch.autograd.Function):
    """H(τ) forward, σ'(τ/T)/T backward."""

    @staticmethod
    def forward(ctx, tau: torch.Tensor, temperature: float) -> torch.Tensor:
        ctx.save_for_backward(tau)
        ctx.temperature = temperature
        return (tau > 0).to(tau.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (tau,) = ctx.saved_tensors
        s = torch.sigmoid(tau / ctx.temperature)
        return grad * s * (1 - s) / ctx.temperature, None


def step_gate(tau: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The hard gate ``H(τ)`` with the sigmoid-derivative surrogate gradient."""
    if temperature <= 0:
        raise NnobsError(f"the surrogate temperature must be positive, got {temperature}")
    return _SurrogateStep.apply(tau, temperature)


def gate_edit(gate: torch.Tensor, mean: torch.Tensor | None) -> Edit:
    """The edit ``m + gate·(x − m)`` over the last axis (``gate·x`` when ``mean`` is None)."""
    if mean is None:
        return lambda x: x * gate.to(x.dtype)
    return lambda x: mean.to(x.dtype) + gate.to(x.dtype) * (x - mean.to(x.dtype))


def gate_edits(
    gates: Mapping[str, torch.Tensor], means: Mapping[str, torch.Tensor] | None
) -> dict[str, Edit]:
    """One edit per site from its gates (and means, for mean ablation)."""
    return {site: gate_edit(g, None if means is None else means[site]) for site, g in gates.items()}


def node_means(
    adapter: ModelAdapter,
    locations: list[NodeLocation],
    reference: torch.Tensor | np.ndarray,
    cache_dir: str | Path | None = None,
) -> dict[str, torch.Tensor]:
    """Each location's mean over the reference windows, from the shared mean cache (keyed
    by the model's weights and the reference tokens, so either changing recomputes it)."""
    means, _ = mean_activations(
        adapter, [loc.site for loc in locations], reference, cache_dir=cache_dir
    )
    return means


class NodeMasks(nn.Module):
    """The τ of every node, one vector per location, initialised at 0.1 ± 0.01 (seeded)."""

    def __init__(
        self, locations: list[NodeLocation], temperature: float = 1.0, seed: int = 0
    ) -> None:
        super().__init__()
        self.locations = list(locations)
        self.temperature = temperature
        gen = torch.Generator().manual_seed(seed)
        self.taus = nn.ParameterList(
            nn.Parameter(TAU_INIT + TAU_NOISE * torch.randn(loc.width, generator=gen))
            for loc in self.locations
        )

    def tau(self) -> dict[str, torch.Tensor]:
        """τ per site (detached copies)."""
        return {
            loc.site: t.detach().clone() for loc, t in zip(self.locations, self.taus, strict=True)
        }

    def gates(self) -> dict[str, torch.Tensor]:
        """``H(τ)`` per site, differentiable through the surrogate."""
        return {
            loc.site: step_gate(t, self.temperature)
            for loc, t in zip(self.locations, self.taus, strict=True)
        }

    def n_active(self, gates: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The number of active nodes (its gradient is the surrogate's)."""
        return sum(g.sum() for g in gates.values())

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp every τ to [−1, 1] (after each optimiser step)."""
        for t in self.taus:
            t.clamp_(-1.0, 1.0)
