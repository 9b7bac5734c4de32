"""Activation sparsity (Gao et al. 2025): at each node location keep, per token, only the
largest-magnitude fraction of the channels and zero the rest.

The model applies it where ``ModelConfig.act_keep`` is set: to each sublayer's input (after
the norm) and output, to the MLP neurons after the activation, and to q, k and v. Gradients
flow through the kept channels only.
"""

from __future__ import annotations

import torch


def keep_top_channels(x: torch.Tensor, fraction: float | None) -> torch.Tensor:
    """``x`` with all but its ``round(fraction * channels)`` (at least one) largest-magnitude
    channels zeroed at every position; ``x`` itself when ``fraction`` is None."""
    if fraction is None:
        return x
    k = max(1, round(fraction * x.shape[-1]))
    if k >= x.shape[-1]:
        return x
    kept = x.detach().abs().topk(k, dim=-1).indices
    mask = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, kept, True)
    return x * mask
