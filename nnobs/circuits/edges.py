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
from dataclasses import dataclass

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

Node = tuple[str, int]  # (site, channel)
Edge = tuple[str, Node, Node, float]  # (kind, source node, target node, weight)


def kept_vectors(adapter: ModelAdapter, kept: Iterable[tuple[str, int]]) -> dict[str, torch.Tensor]:
    """A boolean vector per node location with the ``kept`` channels set."""
    locations = node_locations(adapter)
    vectors = {loc.site: torch.zeros(loc.width, dtype=torch.bool) for loc in locations}
    for site, i in kept:
        if site not in vectors or not 0 <= i < len(vectors[site]):
            raise NnobsError(f"node {site}[{i}] is not a node of this model")
        vectors[site][i] = True
    return vectors


@dataclass(frozen=True)
class WeightBlock:
    """One weight matrix (out, in) between two node locations: ``columns[j]`` is the input
    node channel feeding column ``j`` (the identity except for o_proj under grouped-query
    attention, whose columns repeat the v channels of their group)."""

    kind: str
    weight: torch.Tensor
    source: str
    target: str
    columns: torch.Tensor


def weight_blocks(block, layer: int) -> list[WeightBlock]:
    """The weight matrices of block ``layer`` that join two of its node locations."""
    attn, mlp = block.attn, block.mlp
    site = {n: f"blocks.{layer}.{n}" for n in ("attn_in", "q", "k", "v", "attn_out")}
    site |= {n: f"blocks.{layer}.{n}" for n in ("mlp_in", "mlp_hidden", "mlp_out")}
    group = attn.n_heads // attn.n_kv
    v_channels = torch.arange(attn.n_kv * attn.d_head).view(attn.n_kv, attn.d_head)
    v_columns = v_channels.repeat_interleave(group, 0).flatten()

    def make(kind, linear, source, target, columns=None) -> WeightBlock:
        weight = linear.weight.detach().cpu()
        cols = torch.arange(weight.shape[1]) if columns is None else columns
        return WeightBlock(kind, weight, site[source], site[target], cols)

    out = [
        make("read->q", attn.q_proj, "attn_in", "q"),
        make("read->k", attn.k_proj, "attn_in", "k"),
        make("read->v", attn.v_proj, "attn_in", "v"),
        make("v->write", attn.o_proj, "v", "attn_out", v_columns),
        make("read->neuron", mlp.up, "mlp_in", "mlp_hidden"),
    ]
    if mlp.gate is not None:
        out.append(make("read->neuron", mlp.gate, "mlp_in", "mlp_hidden"))
    out.append(make("neuron->write", mlp.down, "mlp_hidden", "mlp_out"))
    return out


def _kept_entries(matrix: WeightBlock, kept: dict[str, torch.Tensor]) -> torch.Tensor:
    """Nonzero entries of the matrix whose row and column nodes are both kept (bool, out×in)."""
    rows, cols = kept[matrix.target], kept[matrix.source][matrix.columns]
    return (matrix.weight != 0) & rows[:, None] & cols[None, :]


def _gain(norm: torch.nn.Module, width: int) -> torch.Tensor:
    weight = getattr(norm, "weight", None)
    return torch.ones(width) if weight is None else weight.detach().cpu().float()


def residual_pairs(model, kept: dict[str, torch.Tensor]) -> list[Edge]:
    """The ``write->read`` edges: kept (write, later read) pairs on the same channel, through
    a nonzero norm gain (the edge's weight; 1 where the read has no gain)."""
    writes: list[tuple[str, torch.Tensor]] = []  # kept writes so far, in forward order
    edges: list[Edge] = []
    for layer, block in enumerate(model.blocks):
        for sub, norm in (("attn", block.norm1), ("mlp", block.norm2)):
            read_site = f"blocks.{layer}.{sub}_in"
            read = kept[read_site]
            gain = _gain(norm, len(read)) if block.pre else torch.ones(len(read))
            read = read & (gain != 0)
            for write_site, written in writes:
                for c in torch.nonzero(written & read).flatten().tolist():
                    edges.append(("write->read", (write_site, c), (read_site, c), float(gain[c])))
            writes.append((f"blocks.{layer}.{sub}_out", kept[f"blocks.{layer}.{sub}_out"]))
    return edges


def _additive(adapter: ModelAdapter) -> ModelAdapter:
    """The adapter with circuit sites, refused unless its residual stream is a plain sum."""
    adapter = circuit_adapter(adapter)
    if adapter.model.config.residual != "add":
        raise NnobsError(
            f"edges are counted through an additive residual stream; this model's residual "
            f"is {adapter.model.config.residual!r}"
        )
    return adapter


def circuit_edges(adapter: ModelAdapter, kept: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Edges between the ``kept`` nodes (``(site, channel)`` pairs) per kind, and ``total``."""
    adapter = _additive(adapter)
    model = adapter.model
    vectors = kept_vectors(adapter, kept)
    counts = dict.fromkeys(EDGE_KINDS, 0)
    for layer, block in enumerate(model.blocks):
        for matrix in weight_blocks(block, layer):
            counts[matrix.kind] += int(_kept_entries(matrix, vectors).sum())
    counts["write->read"] = len(residual_pairs(model, vectors))
    counts["total"] = sum(counts[kind] for kind in EDGE_KINDS)
    return counts


def circuit_edge_list(adapter: ModelAdapter, kept: Iterable[tuple[str, int]]) -> list[Edge]:
    """Every edge :func:`circuit_edges` counts, as ``(kind, source node, target node,
    weight)``; a SwiGLU neuron's up and gate entries from one read are two edges."""
    adapter = _additive(adapter)
    model = adapter.model
    vectors = kept_vectors(adapter, kept)
    edges: list[Edge] = []
    for layer, block in enumerate(model.blocks):
        for matrix in weight_blocks(block, layer):
            for row, col in torch.nonzero(_kept_entries(matrix, vectors)).tolist():
                source = (matrix.source, int(matrix.columns[col]))
                weight = float(matrix.weight[row, col])
                edges.append((matrix.kind, source, (matrix.target, row), weight))
    return edges + residual_pairs(model, vectors)
