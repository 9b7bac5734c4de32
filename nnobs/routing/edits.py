"""Edits of routing weights (``blocks.{l}.route_attn`` / ``route_mlp``, batch × pos × sources).

Each edit returns a function for :meth:`~nnobs.models.adapter.ModelAdapter.hooks`: it receives
the weights a sublayer computed and returns the weights it mixes its sources with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from nnobs.core.errors import NnobsError

Edit = Callable[[torch.Tensor], torch.Tensor]


def _check_indices(indices: Sequence[int], n_sources: int) -> list[int]:
    chosen = sorted(set(indices))
    if not chosen or chosen[0] < 0 or chosen[-1] >= n_sources:
        raise NnobsError(
            f"source indices {list(indices)} must be non-empty and in 0..{n_sources - 1}"
        )
    return chosen


def mask_sources(indices: Sequence[int], n_sources: int) -> Edit:
    """Mask sources out of the softmax and renormalise the rest (the softmax over the other
    sources' logits); masking every source is refused: the mix would be empty."""
    chosen = _check_indices(indices, n_sources)
    if len(chosen) == n_sources:
        raise NnobsError(
            f"masking all {n_sources} sources leaves nothing to route: keep at least one"
        )

    def edit(weights: torch.Tensor) -> torch.Tensor:
        kept = weights.clone()
        kept[..., chosen] = 0
        return kept / kept.sum(-1, keepdim=True)

    return edit


def fix_sources(
    indices: Sequence[int], values: torch.Tensor | Sequence[float], n_sources: int
) -> Edit:
    """Fix the weights of some sources to ``values`` (e.g. their corpus mean) and rescale the
    others so the weights still sum to one. Fixing every source fixes the whole routing
    (``values`` must then sum to one)."""
    chosen = _check_indices(indices, n_sources)
    fixed = torch.as_tensor(values, dtype=torch.float64).flatten()
    if fixed.numel() != len(chosen) or fixed.min() < 0 or fixed.sum() > 1 + 1e-6:
        raise NnobsError(
            f"fixed weights {fixed.tolist()} must be one per source, non-negative, summing to "
            "at most 1"
        )
    if len(chosen) == n_sources and abs(float(fixed.sum()) - 1) > 1e-6:
        raise NnobsError(f"fixing every source needs weights summing to 1, got {fixed.sum():.6g}")
    others = [i for i in range(n_sources) if i not in chosen]

    def edit(weights: torch.Tensor) -> torch.Tensor:
        out = weights.clone()
        out[..., chosen] = fixed.to(weights)
        if others:
            rest = weights[..., others]
            scale = (1 - fixed.sum().to(weights)) / rest.sum(-1, keepdim=True).clamp_min(1e-12)
            out[..., others] = rest * scale
        return out

    return edit
