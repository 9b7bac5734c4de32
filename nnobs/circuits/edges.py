"""Circuit size in edges: the nonzero weights between kept nodes (Gao et al. 2025).

Within a block an edge is one nonzero entry of a weight matrix whose input and output
channels are both kept:

- ``read->q``, ``read->k``, ``read->v``: attention read channel → q/k/v channel (q/k/v_proj);
- ``v->write``: v channel → attention write channel (o_proj; with grouped-query attention a
  v channel feeds the o_proj columns of every query head of its group);
- ``read->neuron``: MLP read channel → neuron (the up-projection, and the gate for SwiGLU);
- ``neuron->write``: neuron → MLP write channel (the down-projection).

Between sublayers the residual stream carries a write at channel ``c`` to every later read
at channel ``c`` (``write->read``): one edge per kept (write, later read) pair on the same
channel whose norm gain there is nonzero. q and k meet in the attention scores, through
activations rather than weights, so they share no edge.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from nnobs.circuits.nodes import circuit_adapter, node_locations
from nnobs.core.errors import NnobsError
from nnobs.models.adapter import ModelAdapter

EDGE_KINDS = (
    "read->q",
    "read->k",
    "read->v",
    "v->write",
    "read->neuron",
    "neuron->write",
    "write->read",
)


def kept_vectors(adapter: ModelAdapter, kept: Iterable[tuple[str, int]]) -> dict[str, torch.Tensor]:
    """A boolean vector per node location with the ``kept`` channels set."""
    locations = node_locations(adapter)
    vectors = {loc.site: torch.zeros(loc.width, dtype=torch.bool) for loc in locations}
    for site, i in kept:
        if site not in vectors or not 0 <= i < len(vectors[site]):
            raise NnobsError(f"node {site}[{i}] is not a node of this model")
        vectors[site][i] = True
    return vectors


def _nonzero_between(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> int:
    """Nonzero entries of ``weight`` (out, in) in kept rows and kept columns."""
    return int((weight.detach().cpu() != 0)[rows][:, cols].sum())


def _gain_nonzero(norm: torch.nn.Module, width: int) -> torch.Tensor:
    weight = getattr(norm, "weight", None)
    return torch.ones(width, dtype=torch.bool) if weight is None else weight.detach().cpu() != 0


def _block_edges(block, kept: dict[str, torch.Tensor], layer: int) -> dict[str, int]:
    attn, mlp = block.attn, block.mlp
    at = {
        name: kept[f"blocks.{layer}.{name}"]
        for name in ("attn_in", "q", "k", "v", "attn_out", "mlp_in", "mlp_hidden", "mlp_out")
    }
    group = attn.n_heads // attn.n_kv
    v_cols = at["v"].view(attn.n_kv, attn.d_head).repeat_interleave(group, 0).flatten()
    up = _nonzero_between(mlp.up.weight, at["mlp_hidden"], at["mlp_in"])
    if mlp.gate is not None:
        up += _nonzero_between(mlp.gate.weight, at["mlp_hidden"], at["mlp_in"])
    return {
        "read->q": _nonzero_between(attn.q_proj.weight, at["q"], at["attn_in"]),
        "read->k": _nonzero_between(attn.k_proj.weight, at["k"], at["attn_in"]),
        "read->v": _nonzero_between(attn.v_proj.weight, at["v"], at["attn_in"]),
        "v->write": _nonzero_between(attn.o_proj.weight, at["attn_out"], v_cols),
        "read->neuron": up,
        "neuron->write": _nonzero_between(mlp.down.weight, at["mlp_out"], at["mlp_hidden"]),
    }


def _residual_edges(model, kept: dict[str, torch.Tensor]) -> int:
    """Kept (write, later read) pairs on the same channel, through a nonzero norm gain."""
    writes = torch.zeros(model.config.d_model, dtype=torch.long)  # kept writes so far
    total = 0
    for layer, block in enumerate(model.blocks):
        for sub, norm in (("attn", block.norm1), ("mlp", block.norm2)):
            read = kept[f"blocks.{layer}.{sub}_in"]
            if block.pre:
                read = read & _gain_nonzero(norm, len(read))
            total += int(writes[read].sum())
            writes += kept[f"blocks.{layer}.{sub}_out"].long()
    return total


def circuit_edges(adapter: ModelAdapter, kept: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Edges between the ``kept`` nodes (``(site, channel)`` pairs) per kind, and ``total``."""
    adapter = circuit_adapter(adapter)
    model = adapter.model
    if model.config.residual != "add":
        raise NnobsError(
            f"edges are counted through an additive residual stream; this model's residual "
            f"is {model.config.residual!r}"
        )
    vectors = kept_vectors(adapter, kept)
    counts = dict.fromkeys(EDGE_KINDS, 0)
    for layer, block in enumerate(model.blocks):
        for kind, n in _block_edges(block, vectors, layer).items():
            counts[kind] += n
    counts["write->read"] = _residual_edges(model, vectors)
    counts["total"] = sum(counts[kind] for kind in EDGE_KINDS)
    return counts
