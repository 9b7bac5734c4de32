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
from nnobs.core.fields import from_fields

CHOICES: dict[str, tuple[str, ...]] = {
    "activation": ("relu", "gelu", "swiglu"),
    "norm": ("layernorm", "rmsnorm", "none"),
    "norm_placement": ("pre", "post"),
    "residual": ("add", "none"),
    "positions": ("learned", "rope"),
}


@dataclass
class ModelConfig:
    """A decoder-only transformer, one knob per architectural choice.

    ``d_mlp`` may be one width for every layer or a list with one width per layer (a
    bottleneck is a layer with a small width). ``n_kv_heads`` below ``n_heads`` gives
    grouped-query attention. ``aux_layer``/``aux_weight`` add intermediate supervision:
    a next-token loss read out from block ``aux_layer`` through the final norm and unembedding.
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

    def __post_init__(self) -> None:
        for knob, allowed in CHOICES.items():
            value = getattr(self, knob)
            if value not in allowed:
                raise NnobsError(f"unknown {knob} {value!r}: choose one of {', '.join(allowed)}")
        for knob in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            if not isinstance(getattr(self, knob), int) or getattr(self, knob) < 1:
                raise NnobsError(f"{knob} must be a positive integer, got {getattr(self, knob)!r}")
        if self.d_model % self.n_heads:
            raise NnobsError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}: "
                "pick a width that is a multiple of the head count"
            )
        if self.positions == "rope" and self.head_dim % 2:
            raise NnobsError(f"rope needs an even head dimension, got {self.head_dim}")
        if self.kv_heads < 1 or self.n_heads % self.kv_heads:
            raise NnobsError(
                f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} "
                "(grouped-query attention shares each key/value head among a group)"
            )
        widths = self.mlp_widths
        if len(widths) != self.n_layers or any(not isinstance(w, int) or w < 1 for w in widths):
            raise NnobsError(
                f"d_mlp must be a positive integer or a list of {self.n_layers} positive "
                f"integers (one per layer), got {self.d_mlp!r}"
            )
        if self.aux_layer is not None and not 0 <= self.aux_layer < self.n_layers:
            raise NnobsError(
                f"aux_layer={self.aux_layer} is out of range: "
                f"the model has layers 0..{self.n_layers - 1}"
            )
        if self.aux_weight < 0:
            raise NnobsError(f"aux_weight must be >= 0, got {self.aux_weight}")

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.d_model // self.n_heads

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
        """The knobs as a JSON-able dict (what run.json and checkpoints store)."""
        return dataclasses.asdict(self)

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
