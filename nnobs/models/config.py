"""The architecture as one dataclass of explicit knobs, plus parameter counting and matching.

Every architecture study in nnobs varies fields of :class:`ModelConfig`; nothing about the
architecture lives anywhere else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from nnobs.core.errors import NnobsError
from nnobs.core.fields import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    from_fields,
    is_int,
)

CHOICES: dict[str, tuple[str, ...]] = {
    "activation": ("relu", "gelu", "swiglu"),
    "norm": ("layernorm", "rmsnorm", "none"),
    "norm_placement": ("pre", "post"),
    "residual": ("add", "none", "attnres"),
    "positions": ("learned", "rope", "none"),
}

# Knobs whose unset value (None) is not written (see ModelConfig.to_dict).
LATER_KNOBS = frozenset({"d_head", "attnres_blocks", "act_keep", "attn_sinks"})


@dataclass
class ModelConfig:
    """A decoder-only transformer, one knob per architectural choice.

    ``d_mlp`` may be one width for every layer or a list with one width per layer (a
    bottleneck is a layer with a small width). ``n_kv_heads`` below ``n_heads`` gives
    grouped-query attention. ``d_head`` sets the channels per head apart from ``d_model``
    (default ``d_model / n_heads``), so heads can be added at a fixed width.
    ``aux_layer``/``aux_weight`` add intermediate supervision: a next-token loss read out
    from block ``aux_layer`` through the final norm and unembedding.
    ``residual="attnres"`` routes each sublayer's input over depth sources grouped into
    ``attnres_blocks`` blocks (default: one per layer; see :mod:`nnobs.models.attnres`).
    ``act_keep`` keeps, per token, that fraction of the largest-magnitude channels at every
    sublayer input and output, the MLP neurons and q, k, v (activation sparsity; see
    :mod:`nnobs.models.activation_sparsity`). ``attn_sinks`` gives every head a learned
    logit on an extra key slot whose value is zero, so a head can attend to nothing (its
    ``attn_pattern`` rows then sum to less than 1); ``positions="none"`` adds no position
    information (a causal model can still infer it).
    """

    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    d_mlp: int | list[int] | None = None
    max_seq_len: int = 256
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_placement: str = "pre"
    residual: str = "add"
    positions: str = "learned"
    tie_embeddings: bool = True
    bias: bool = False
    rope_base: float = 10000.0
    aux_layer: int | None = None
    aux_weight: float = 0.0
    d_head: int | None = None
    attnres_blocks: int | None = None
    act_keep: float | None = None
    attn_sinks: bool | None = None

    def __post_init__(self) -> None:
        for knob, allowed in CHOICES.items():
            check_choice(knob, getattr(self, knob), allowed)
        for knob in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            check_int(f"model.{knob}", getattr(self, knob), 1)
        for knob in ("tie_embeddings", "bias"):
            check_bool(f"model.{knob}", getattr(self, knob))
        # The rotation frequencies are base ** (-2i / head_dim): a base of 1 gives every
        # channel pair the same one, a smaller base makes them rise instead of fall.
        check_number("model.rope_base", self.rope_base, 1, open_low=True)
        check_number("model.aux_weight", self.aux_weight, 0)
        if self.n_kv_heads is not None:
            check_int("model.n_kv_heads", self.n_kv_heads, 1)
        if self.aux_layer is not None:
            check_int("model.aux_layer", self.aux_layer, 0)
        if self.d_head is not None:
            check_int("model.d_head", self.d_head, 1)
        if self.attnres_blocks is not None:
            check_int("model.attnres_blocks", self.attnres_blocks, 1)
        if self.act_keep is not None:
            check_number("model.act_keep", self.act_keep, 0, 1, open_low=True)
        if self.attn_sinks is not None:
            check_bool("model.attn_sinks", self.attn_sinks)
        self._check_shapes()

    def _check_shapes(self) -> None:
        """The knobs that constrain each other, once each has the right type."""
        if self.d_head is None and self.d_model % self.n_heads:
            raise NnobsError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}: "
                "pick a width that is a multiple of the head count"
            )
        if self.positions == "rope" and self.head_dim % 2:
            raise NnobsError(f"rope needs an even head dimension, got {self.head_dim}")
        if self.n_heads % self.kv_heads:
            raise NnobsError(
                f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} "
                "(grouped-query attention shares each key/value head among a group)"
            )
        per_layer = isinstance(self.d_mlp, list)
        widths = self.d_mlp if per_layer else [] if self.d_mlp is None else [self.d_mlp]
        if (per_layer and len(widths) != self.n_layers) or any(
            not is_int(w) or w < 1 for w in widths
        ):
            raise NnobsError(
                f"model.d_mlp must be a positive integer or a list of {self.n_layers} positive "
                f"integers (one per layer), got {self.d_mlp!r}"
            )
        if self.attnres_blocks is not None and self.residual != "attnres":
            raise NnobsError(
                f"model.attnres_blocks applies to residual='attnres' only; this model's "
                f"residual is {self.residual!r}"
            )
        if self.n_layers % self.routing_blocks:
            raise NnobsError(
                f"attnres_blocks={self.attnres_blocks} does not divide n_layers={self.n_layers}: "
                "blocks are groups of equal depth"
            )
        if self.aux_layer is not None and self.aux_layer >= self.n_layers:
            raise NnobsError(
                f"aux_layer={self.aux_layer} is out of range: "
                f"the model has layers 0..{self.n_layers - 1}"
            )

    @property
    def head_dim(self) -> int:
        """Channels per attention head (``d_head``, else ``d_model / n_heads``)."""
        return self.d_model // self.n_heads if self.d_head is None else self.d_head

    @property
    def routing_blocks(self) -> int:
        """Blocks of a routed residual (``attnres_blocks``, else one per layer)."""
        return self.n_layers if self.attnres_blocks is None else self.attnres_blocks

    @property
    def kv_heads(self) -> int:
        """Key/value heads (``n_heads`` unless grouped-query attention shares them)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def mlp_widths(self) -> list[int]:
        """The MLP width of each layer."""
        if self.d_mlp is None:
            return [4 * self.d_model] * self.n_layers
        if isinstance(self.d_mlp, int):
            return [self.d_mlp] * self.n_layers
        return list(self.d_mlp)

    def to_dict(self) -> dict[str, Any]:
        """The knobs as a JSON-able dict (what run.json and checkpoints store). Knobs added
        later are left out while unset, so existing runs keep their stored config and hash."""
        data = dataclasses.asdict(self)
        return {k: v for k, v in data.items() if not (k in LATER_KNOBS and v is None)}

    @staticmethod
    def upgrade_dict(data: dict[str, Any]) -> dict[str, Any]:
        """A stored config dict as this version writes it: older versions also wrote an
        always-empty ``extra``, which is dropped (a non-empty one is left to be refused)."""
        return {k: v for k, v in data.items() if not (k == "extra" and v == {})}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """The config a stored dict describes; an unknown knob is refused with the known ones."""
        data = cls.upgrade_dict(data)
        return from_fields(cls, data, "model knob")

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some knobs changed (and validated)."""
        return ModelConfig.from_dict({**self.to_dict(), **changes})

    @property
    def hash(self) -> str:
        """Short content hash: two configs with the same hash build the same architecture."""
        # The hash's input keeps the retired empty ``extra``: stable hashes let existing runs
        # resume and keep cached results valid.
        blob = json.dumps({**self.to_dict(), "extra": {}}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]
