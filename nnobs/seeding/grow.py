"""Growing a trained model into a larger one that computes exactly the same function.

The small model's layers go to a subset of the large model's (``layer_map``: the large layer
of each small one, increasing; default the first ones), its heads to the first heads of
those layers, its neurons to the first neurons, its residual channels to the first channels.
Everything else is initialised as a fresh model of the large config would be (from ``seed``),
except the weights that would let new units change the output, which are zero:

- a new head's output columns of ``o_proj`` and a new neuron's column of the down-projection;
- in a new layer, the whole output projection and down-projection (and their biases): with a
  pre-norm residual sum the layer then adds exactly zero;
- new residual channels' rows of every matrix that writes the stream, and their embedding
  columns: they stay zero, so the small model's channels see what they saw.

That is exact only where nothing mixes the new channels in: a LayerNorm or RMSNorm averages
over the channels, so a wider residual stream is supported only without norms, and new layers
only with a pre-norm residual sum (post-norm normalises again after each sublayer). Heads
are copied whole, so the head dimension must match (``model.d_head`` fixes it while
``n_heads`` grows), and grouped-query attention must keep its group size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nnobs.core.errors import NnobsError
from nnobs.models.config import ModelConfig
from nnobs.models.transformer import Block, Transformer

# Knobs the two models must share: they change what a copied weight computes.
SAME_KNOBS = (
    "vocab_size",
    *("activation", "norm", "norm_placement", "residual", "positions"),
    *("tie_embeddings", "bias", "rope_base"),
)
# Residual paths grow handles (a routed residual mixes depth sources, which new layers change).
GROWABLE_RESIDUALS = ("add", "none")


@dataclass(frozen=True)
class GrowthPlan:
    """Where each part of the small model goes in the large one (validated on creation)."""

    small: ModelConfig
    large: ModelConfig
    layer_map: tuple[int, ...]

    def __post_init__(self) -> None:
        check_growable(self.small, self.large, self.layer_map)

    @classmethod
    def of(
        cls, small: ModelConfig, large: ModelConfig, layer_map: Sequence[int] | None = None
    ) -> GrowthPlan:
        """The plan; ``layer_map`` None puts the small layers first."""
        layers = tuple(range(small.n_layers)) if layer_map is None else tuple(layer_map)
        return cls(small, large, layers)

    def to_dict(self) -> dict:
        return {"layer_map": list(self.layer_map)}


def check_growable(small: ModelConfig, large: ModelConfig, layer_map: Sequence[int]) -> None:
    """Refuse, in one line, a large config the small model cannot be embedded in exactly."""
    for knob in SAME_KNOBS:
        if getattr(small, knob) != getattr(large, knob):
            raise NnobsError(
                f"the large config's {knob} is {getattr(large, knob)!r} but the small model's "
                f"is {getattr(small, knob)!r}: grow keeps {knob} (the copied weights depend on it)"
            )
    if small.residual not in GROWABLE_RESIDUALS:
        raise NnobsError(
            f"grow supports residual {' or '.join(GROWABLE_RESIDUALS)}, not {small.residual!r}"
        )
    for knob, a, b in (
        ("d_model", small.d_model, large.d_model),
        ("n_layers", small.n_layers, large.n_layers),
        ("n_heads", small.n_heads, large.n_heads),
        ("n_kv_heads", small.kv_heads, large.kv_heads),
        ("max_seq_len", small.max_seq_len, large.max_seq_len),
    ):
        if b < a:
            raise NnobsError(
                f"the large config is smaller than the small model: {knob} {b} < {a}; "
                "grow only adds heads, neurons, layers and channels"
            )
    if small.head_dim != large.head_dim:
        raise NnobsError(
            f"head dimension {large.head_dim} differs from the small model's {small.head_dim}: "
            f"heads are copied whole, so set model.d_head = {small.head_dim} in the large config"
        )
    if small.n_heads // small.kv_heads != large.n_heads // large.kv_heads:
        raise NnobsError(
            "grouped-query attention must keep its group size (n_heads / n_kv_heads): "
            f"{small.n_heads}/{small.kv_heads} vs {large.n_heads}/{large.kv_heads}"
        )
    if large.d_model > small.d_model and small.norm != "none":
        raise NnobsError(
            f"a wider residual stream (d_model {small.d_model} -> {large.d_model}) is not exact "
            f"with norm={small.norm!r}: the norm averages over the new channels; keep d_model"
        )
    _check_layer_map(small, large, layer_map)


def _check_layer_map(small: ModelConfig, large: ModelConfig, layer_map: Sequence[int]) -> None:
    if (
        len(layer_map) != small.n_layers
        or any(not 0 <= j < large.n_layers for j in layer_map)
        or list(layer_map) != sorted(set(layer_map))
    ):
        raise NnobsError(
            f"layer map {list(layer_map)} must give each of the {small.n_layers} small layers a "
            f"distinct large layer in 0..{large.n_layers - 1}, increasing"
        )
    if large.n_layers > small.n_layers and (
        small.residual != "add" or small.norm_placement != "pre"
    ):
        raise NnobsError(
            "new layers are exact only with a pre-norm residual sum (residual='add', "
            f"norm_placement='pre'); this model has residual={small.residual!r}, "
            f"norm_placement={small.norm_placement!r}: keep n_layers"
        )
    for i, j in enumerate(layer_map):
        if large.mlp_widths[j] < small.mlp_widths[i]:
            raise NnobsError(
                f"the large config is smaller than the small model: layer {j}'s MLP width "
                f"{large.mlp_widths[j]} < small layer {i}'s {small.mlp_widths[i]}"
            )


@torch.no_grad()
def grow_model(small: Transformer, plan: GrowthPlan, seed: int = 0) -> Transformer:
    """The large model of ``plan`` with ``small`` embedded in it (see the module doc); the
    rest initialised as ``Transformer(plan.large)`` from ``seed`` would be."""
    large = Transformer(plan.large, generator=torch.Generator().manual_seed(seed))
    ds = plan.small.d_model
    _put(large.tok_emb.weight, small.tok_emb.weight, zero_rows_from=None, zero_cols_from=ds)
    if small.pos_emb is not None:
        _put(large.pos_emb.weight, small.pos_emb.weight, zero_rows_from=None, zero_cols_from=ds)
    if not plan.large.tie_embeddings:
        large.unembed.weight[:, :ds] = small.unembed.weight
    _copy_norm(large.final_norm, small.final_norm)
    for j, block in enumerate(large.blocks):
        if j not in plan.layer_map:
            _silence(block)
    for i, j in enumerate(plan.layer_map):
        _embed_block(large.blocks[j], small.blocks[i], plan.small)
    return large


def _put(
    dst: torch.Tensor,
    src: torch.Tensor,
    zero_rows_from: int | None,
    zero_cols_from: int | None,
) -> None:
    """Copy ``src`` into the leading corner of ``dst``; zero the rows (then columns) of
    ``dst`` from the given index on, outside the copied corner too."""
    if zero_rows_from is not None:
        dst[zero_rows_from:] = 0
    if zero_cols_from is not None and dst.dim() == 2:
        dst[:, zero_cols_from:] = 0
    dst[tuple(slice(0, n) for n in src.shape)] = src


def _copy_norm(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    for (name, p), q in zip(dst.named_parameters(), src.parameters(), strict=True):
        if p.shape != q.shape:  # only without norms may the width change: never reached
            raise NnobsError(f"norm parameter {name} changed shape {tuple(q.shape)}")
        p.copy_(q)


def _silence(block: Block) -> None:
    """A new layer adds nothing: its sublayers' output projections are zero."""
    for linear in (block.attn.o_proj, block.mlp.down):
        linear.weight.zero_()
        if linear.bias is not None:
            linear.bias.zero_()


def _embed_block(dst: Block, src: Block, small: ModelConfig) -> None:
    """Copy a small block into a large one: first heads, first neurons, first channels; the
    new heads, neurons and channels write nothing."""
    ds, q_rows = small.d_model, small.n_heads * small.head_dim
    kv_rows = small.kv_heads * small.head_dim
    _copy_norm(dst.norm1, src.norm1)
    _copy_norm(dst.norm2, src.norm2)
    a, b = dst.attn, src.attn
    for big, little, rows in ((a.q_proj, b.q_proj, q_rows), *(
        (getattr(a, n), getattr(b, n), kv_rows) for n in ("k_proj", "v_proj")
    )):  # fmt: skip
        big.weight[:rows, :ds] = little.weight
        if big.bias is not None:
            big.bias[:rows] = little.bias
    # Outputs: new heads' and neurons' columns, and new channels' rows, are zero.
    _put(a.o_proj.weight, b.o_proj.weight, zero_rows_from=ds, zero_cols_from=q_rows)
    width = src.mlp.up.out_features
    for name in ("up", "gate"):
        big, little = getattr(dst.mlp, name), getattr(src.mlp, name)
        if little is not None:
            big.weight[:width, :ds] = little.weight
            if big.bias is not None:
                big.bias[:width] = little.bias
    _put(dst.mlp.down.weight, src.mlp.down.weight, zero_rows_from=ds, zero_cols_from=width)
    for big, little in ((a.o_proj, b.o_proj), (dst.mlp.down, src.mlp.down)):
        if big.bias is not None:
            _put(big.bias, little.bias, zero_rows_from=ds, zero_cols_from=None)


@torch.no_grad()
def max_logit_difference(small: Transformer, large: Transformer, windows: torch.Tensor) -> float:
    """The largest absolute difference between the two models' logits on ``windows``
    (token ids, one row per window), in float32 on the CPU."""
    small, large = small.eval(), large.eval()
    worst = 0.0
    for rows in windows.split(8):
        diff = (small(rows) - large(rows)).abs().max().item()
        worst = max(worst, diff) if math.isfinite(diff) else math.inf
    return worst
