"""The hook-site kinds: one table that the model, the adapters, capture, interventions and the
README's hook-site table all read.

A site is either global (``embed``, ``final``) or per layer (``blocks.{l}.<kind>``). A new kind
(routing weights, dictionary features) is one new row here, a :class:`HookPoint` where the
model computes it, and its line in the README.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SiteKind:
    """One kind of hook site: its name, the shape of its activation, and what it holds.

    ``shape`` names the axes in order (``"batch × pos × d_model"``); ``unit_axis`` is the axis
    of attention heads or MLP neurons that an intervention can select part of, if any.
    """

    name: str
    per_layer: bool
    shape: str
    meaning: str
    unit_axis: int | None = None

    @property
    def pattern(self) -> str:
        """How sites of this kind are named: ``blocks.{l}.resid_pre``, or ``embed``."""
        return f"blocks.{{l}}.{self.name}" if self.per_layer else self.name

    @property
    def axes(self) -> tuple[str, ...]:
        """The axis names, in order."""
        return tuple(self.shape.split(" × "))

    @property
    def position_axis(self) -> int:
        """The axis of token positions (the query position where there are two)."""
        return self.axes.index("pos")

    @property
    def per_token(self) -> bool:
        """One activation per token: (batch, pos, ...), the rows capture stores."""
        return self.position_axis == 1


# In forward order: the embedding, one block's sites, the final norm's output.
SITE_KINDS: dict[str, SiteKind] = {
    kind.name: kind
    for kind in (
        SiteKind("embed", False, "batch × pos × d_model", "token (+ position) embedding"),
        SiteKind("resid_pre", True, "batch × pos × d_model", "residual stream entering block l"),
        SiteKind(
            "route_attn",
            True,
            "batch × pos × sources",
            "routing weights over depth sources before attention (routed residuals only)",
        ),
        SiteKind("attn_pattern", True, "batch × heads × pos × pos", "attention weights", 1),
        SiteKind(
            "head_out",
            True,
            "batch × pos × heads × d_head",
            "per-head outputs before the output projection",
            2,
        ),
        SiteKind("attn_out", True, "batch × pos × d_model", "what attention adds"),
        SiteKind("resid_mid", True, "batch × pos × d_model", "between attention and MLP"),
        SiteKind(
            "route_mlp",
            True,
            "batch × pos × sources",
            "routing weights over depth sources before the MLP (routed residuals only)",
        ),
        SiteKind("mlp_hidden", True, "batch × pos × d_mlp", "MLP neurons after the activation", 2),
        SiteKind("mlp_out", True, "batch × pos × d_model", "what the MLP adds"),
        SiteKind(
            "resid_post",
            True,
            "batch × pos × d_model",
            "stream leaving block l (default probe site)",
        ),
        SiteKind("final", False, "batch × pos × d_model", "stream after the final norm"),
    )
}

# The kinds of ``blocks.{l}.<kind>`` sites, in forward order within a block.
LAYER_SITE_KINDS: tuple[str, ...] = tuple(k.name for k in SITE_KINDS.values() if k.per_layer)

# The kinds only a routed residual (``residual="attnres"`` or a wrapped model) has.
ROUTE_SITE_KINDS: tuple[str, ...] = ("route_attn", "route_mlp")


def site_kind(site: str) -> str:
    """``"blocks.3.mlp_out"`` -> ``"mlp_out"``; ``"embed"`` -> ``"embed"``."""
    return site.rsplit(".", 1)[-1]
