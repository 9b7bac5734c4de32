"""The identity module every named hook site is (see :mod:`nnobs.models.sites`)."""

from __future__ import annotations

import torch
from torch import nn


class HookPoint(nn.Module):
    """Identity at a named site; forward hooks on it read or replace the activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
