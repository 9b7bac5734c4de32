"""The node locations of circuit pruning in an nnobs transformer.

A node is one channel at one location; every location is a hook site of the adapter:

- ``resid_read``: a sublayer's input after its norm, ``blocks.{l}.attn_in`` and
  ``blocks.{l}.mlp_in`` (the attention and MLP modules' inputs);
- ``resid_write``: a sublayer's output before it joins the stream, ``blocks.{l}.attn_out``
  and ``blocks.{l}.mlp_out``;
- ``mlp_neuron``: the MLP's hidden units after the activation, ``blocks.{l}.mlp_hidden``;
- ``q``, ``k``, ``v``: the projections' output channels, ``blocks.{l}.q`` (``k``, ``v``),
  read before rotary positions (the gate of a channel commutes with nothing else there).

The reads and q/k/v are not named sites of the model: :func:`circuit_adapter` adds them to
a copy of the adapter as module input/output sites, so the model itself is never edited.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

from nnobs.core.errors import NnobsError
from nnobs.models.adapter import ModelAdapter, Site
from nnobs.models.transformer import Transformer

NODE_KINDS = ("resid_read", "resid_write", "mlp_neuron", "q", "k", "v")


@dataclass(frozen=True)
class NodeLocation:
    """One location: its hook site, node kind, layer, sublayer (``attn``/``mlp``) and the
    number of channels (nodes) it holds."""

    site: str
    kind: str
    layer: int
    sublayer: str
    width: int


def _transformer(adapter: ModelAdapter) -> Transformer:
    if not isinstance(adapter.model, Transformer):
        raise NnobsError(
            "circuit pruning needs an nnobs Transformer (its attention and MLP inputs and q, k, "
            f"v projections), got {type(adapter.model).__name__}"
        )
    return adapter.model


def node_locations(adapter: ModelAdapter) -> list[NodeLocation]:
    """Every node location of the model, layer by layer in forward order."""
    model = _transformer(adapter)
    cfg = model.config
    q_width, kv_width = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out: list[NodeLocation] = []
    for layer in range(cfg.n_layers):
        width = cfg.mlp_widths[layer]
        out += [
            NodeLocation(f"blocks.{layer}.attn_in", "resid_read", layer, "attn", cfg.d_model),
            NodeLocation(f"blocks.{layer}.q", "q", layer, "attn", q_width),
            NodeLocation(f"blocks.{layer}.k", "k", layer, "attn", kv_width),
            NodeLocation(f"blocks.{layer}.v", "v", layer, "attn", kv_width),
            NodeLocation(f"blocks.{layer}.attn_out", "resid_write", layer, "attn", cfg.d_model),
            NodeLocation(f"blocks.{layer}.mlp_in", "resid_read", layer, "mlp", cfg.d_model),
            NodeLocation(f"blocks.{layer}.mlp_hidden", "mlp_neuron", layer, "mlp", width),
            NodeLocation(f"blocks.{layer}.mlp_out", "resid_write", layer, "mlp", cfg.d_model),
        ]
    return out


def circuit_adapter(adapter: ModelAdapter) -> ModelAdapter:
    """A copy of ``adapter`` that also names the read and q/k/v sites of every block."""
    model = _transformer(adapter)
    extra: dict[str, Site] = {}
    for layer, block in enumerate(model.blocks):
        extra[f"blocks.{layer}.attn_in"] = Site(block.attn, where="input")
        extra[f"blocks.{layer}.mlp_in"] = Site(block.mlp, where="input")
        for name, proj in zip("qkv", block.attn.projections(), strict=True):
            extra[f"blocks.{layer}.{name}"] = Site(proj)
    return dataclasses.replace(adapter, sites={**adapter.sites, **extra})


def node_counts(locations: list[NodeLocation]) -> dict[str, int]:
    """Nodes per kind (every kind listed, zero where absent)."""
    counts = Counter()
    for loc in locations:
        counts[loc.kind] += loc.width
    return {kind: counts[kind] for kind in NODE_KINDS}
