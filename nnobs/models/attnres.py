"""Block Attention Residuals: each sublayer reads a softmax-weighted mix of depth sources.

With ``residual="attnres"`` the layers are grouped into ``attnres_blocks`` blocks of equal
depth. Before attention and before the MLP of every layer the sublayer's input is
``Σ_i α_i v_i`` with ``α = softmax_i(w · RMSNorm(v_i))``: one learned query ``w`` per sublayer,
zero-initialised so routing starts uniform, and its own RMSNorm gain. The sources ``v_i`` are
the token embedding, the summed output of each completed block, and the current block's partial
sum (absent at a block's first sublayer). ``attnres_blocks = n_layers`` gives every layer its
own source (full AttnRes); ``attnres_blocks = 1`` leaves two sources, the embedding and the
sum of everything written since, so routing only weighs the embedding against the rest (the
closest to a plain residual).

The running sum of all sources is still kept: it is what ``resid_pre``/``resid_post`` hold and
what the final norm reads, so a routed model and its additive twin share the readout. The
weights ``α`` pass through the hook sites ``blocks.{l}.route_attn`` / ``blocks.{l}.route_mlp``
(batch × pos × sources; :func:`source_names` names the sources), where they can be read or
replaced before the mix.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nnobs.models.hooks import HookPoint

SUBLAYERS = ("attn", "mlp")
# What a source is, by name: the embedding, a completed earlier block, the current block.
FAMILIES = ("embedding", "current", "history")


def source_groups(sublayer: int, layers_per_block: int) -> list[tuple[str, list[int]]]:
    """The sources of global sublayer ``sublayer`` (2·layer, +1 for the MLP): each a name and
    the indices of what it sums in the list [embedding, output 0, output 1, ...]."""
    block = sublayer // (2 * layers_per_block)
    groups: list[tuple[str, list[int]]] = [("embed", [0])]
    for done in range(block):
        start = 2 * layers_per_block * done
        groups.append((f"block.{done}", list(range(start + 1, start + 2 * layers_per_block + 1))))
    current = list(range(2 * layers_per_block * block + 1, sublayer + 1))
    if current:
        groups.append(("current", current))
    return groups


def source_names(layer: int, sublayer: str, n_layers: int, n_blocks: int) -> list[str]:
    """Names of the sources routed before ``sublayer`` (``"attn"``/``"mlp"``) of ``layer``."""
    index = 2 * layer + SUBLAYERS.index(sublayer)
    return [name for name, _ in source_groups(index, n_layers // n_blocks)]


def source_family(name: str) -> str:
    """``"embed"`` → embedding, ``"current"`` → current, ``"block.c"`` → history."""
    return {"embed": "embedding", "current": "current"}.get(name, "history")


def stack_sources(written: list[torch.Tensor], layers_per_block: int) -> torch.Tensor:
    """The sources of the next sublayer, (batch, pos, sources, d_model), from everything
    written so far (the embedding, then each sublayer's output in order)."""
    groups = source_groups(len(written) - 1, layers_per_block)
    summed = []
    for _, indices in groups:
        total = written[indices[0]]
        for i in indices[1:]:
            total = total + written[i]
        summed.append(total)
    return torch.stack(summed, dim=-2)


def mix_sources(weights: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """``Σ_i weights_i v_i``: (batch, pos, sources) with (batch, pos, sources, d) → (b, pos, d)."""
    return (weights.unsqueeze(-2) @ stacked).squeeze(-2)


class SourceRouter(nn.Module):
    """The routing of one sublayer: a learned query over RMS-normalised sources.

    A sublayer with a single source (the first layer's attention reads only the embedding)
    has nothing to route and no parameters; its weights are ones.
    """

    def __init__(self, d_model: int, n_sources: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.n_sources, self.eps = n_sources, eps
        learned = n_sources > 1
        self.query = nn.Parameter(torch.zeros(d_model)) if learned else None
        self.gain = nn.Parameter(torch.ones(d_model)) if learned else None
        self.hook_route = HookPoint()

    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        """The sublayer's input from its sources (batch, pos, sources, d_model)."""
        if self.query is None:
            weights = stacked.new_ones(stacked.shape[:-1])
        else:
            keys = F.rms_norm(stacked, (stacked.shape[-1],), self.gain, self.eps)
            weights = (keys @ self.query).softmax(-1)
        return mix_sources(self.hook_route(weights), stacked)


class AttnResidual(nn.Module):
    """The ``attnres`` residual strategy of one layer: a router before each sublayer.

    Follows :class:`~nnobs.models.transformer.ResidualPath`: ``read`` forms the sublayer's
    input from the sources, ``write`` keeps the running sum.
    """

    uses_sources = True

    def __init__(self, config: Any, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.layers_per_block = config.n_layers // config.routing_blocks
        self.route_attn, self.route_mlp = (
            SourceRouter(config.d_model, len(source_groups(2 * layer + i, self.layers_per_block)))
            for i in range(2)
        )

    @classmethod
    def for_layer(cls, config: Any, layer: int) -> AttnResidual:
        """The strategy of ``layer`` of a model built from ``config``."""
        return cls(config, layer)

    def read(self, stream: torch.Tensor, sources: list[torch.Tensor] | None) -> torch.Tensor:
        """The routed mix of the sources (``sources`` holds everything written so far)."""
        assert sources is not None, "attnres routes over the sources the block loop keeps"
        router = self.route_attn if len(sources) == 2 * self.layer + 1 else self.route_mlp
        return router(stack_sources(sources, self.layers_per_block))

    def write(self, stream: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The running sum (the stream the final norm reads)."""
        return stream + out

    def hook_points(self) -> dict[str, HookPoint]:
        """The routing-weight sites of this layer."""
        return {"route_attn": self.route_attn.hook_route, "route_mlp": self.route_mlp.hook_route}
