"""Run a vanilla model as a routed one: a fixed recency-bias schedule over block sources.

A softmax mix equals a running sum only with suitably scaled sources. The wrap groups the
layers into ``n_blocks`` blocks as ``residual="attnres"`` does and gives every sublayer fixed
routing logits, zero for every source and ``recency`` for the newest one, so the weights are
``α_new = e^r / (e^r + K - 1)`` and ``α_other = 1 / (e^r + K - 1)`` for ``K`` sources:
content-independent and known in advance. The sublayer then reads ``Σ_i (α_i / a_i) v_i``
where ``a`` is that schedule: unedited, each coefficient is exactly one and the input is the
plain running sum (the vanilla model's stream, up to float rounding in the order of the sum);
an edit at a ``route_*`` site (masking a family, fixing weights) changes ``α`` and with it
the input. The wrap needs a pre-norm model with a plain residual sum.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from nnobs.core.errors import NnobsError
from nnobs.models.adapter import ModelAdapter, Site
from nnobs.models.attnres import SUBLAYERS, mix_sources, source_groups, stack_sources
from nnobs.models.hooks import HookPoint

DEFAULT_RECENCY = 2.0
# Decoder layers the wrap knows how to route: the norm before each sublayer, by attribute.
_HF_NORMS = ("input_layernorm", "post_attention_layernorm")


def recency_weights(n_sources: int, recency: float = DEFAULT_RECENCY) -> torch.Tensor:
    """The schedule's routing weights over ``n_sources`` sources (the last is the newest)."""
    logits = torch.zeros(n_sources, dtype=torch.float64)
    logits[-1] = recency
    return logits.softmax(0)


def check_blocks(n_layers: int, n_blocks: int) -> None:
    """``n_blocks`` groups ``n_layers`` into blocks of equal depth, or one clear error."""
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 1:
        raise NnobsError(
            f"the number of routing blocks must be a positive integer, got {n_blocks!r}"
        )
    if n_layers % n_blocks:
        raise NnobsError(
            f"{n_blocks} routing blocks do not divide the model's {n_layers} layers: "
            "blocks are groups of equal depth"
        )


def routing_blocks(adapter: ModelAdapter) -> int:
    """The routing blocks of a routed model (``attnres`` or wrapped); refused otherwise."""
    wrapped = adapter.provenance.get("routing")
    if wrapped:
        return int(wrapped["blocks"])
    config = adapter.provenance.get("config") or {}
    residual = config.get("residual", "add")
    if residual != "attnres":
        raise NnobsError(
            f"this model has no routing (its residual is {residual!r}): train one with "
            "model.residual = 'attnres', or wrap it (--wrap-blocks N)"
        )
    return int(config.get("attnres_blocks") or config["n_layers"])


def _sublayer_norms(adapter: ModelAdapter) -> list[tuple[nn.Module, nn.Module]]:
    """The norm before attention and before the MLP of every layer, or one clear refusal."""
    config = adapter.provenance.get("config")
    if adapter.provenance.get("kind") == "nnobs":
        if config["residual"] != "add" or config["norm_placement"] != "pre":
            raise NnobsError(
                "wrapping needs a pre-norm model with a plain residual sum; this one has "
                f"residual={config['residual']!r}, norm_placement={config['norm_placement']!r}"
            )
        return [(block.norm1, block.norm2) for block in adapter.model.blocks]
    layers = [adapter.sites[f"blocks.{i}.resid_pre"].module for i in range(adapter.n_layers)]
    if not all(all(hasattr(layer, name) for name in _HF_NORMS) for layer in layers):
        raise NnobsError(
            f"wrapping a {adapter.provenance.get('architecture')} model is not supported: it "
            "needs Llama/Qwen-style decoder layers (input_layernorm, post_attention_layernorm)"
        )
    return [tuple(getattr(layer, name) for name in _HF_NORMS) for layer in layers]


class _Router:
    """The schedule routing of one sublayer, called from its norm's forward pre-hook."""

    def __init__(self, written: list[torch.Tensor], sublayer: int, per_block: int, recency: float):
        self.written, self.sublayer, self.per_block = written, sublayer, per_block
        self.schedule = recency_weights(len(source_groups(sublayer, per_block)), recency)
        self.hook = HookPoint()

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        if len(self.written) != self.sublayer + 1:
            raise NnobsError(
                "the routing wrap lost track of the sublayer outputs (a sublayer ran out of "
                "order or a site it reads was not called)"
            )
        stacked = stack_sources(self.written, self.per_block)
        schedule = self.schedule.to(stacked)
        weights = self.hook(schedule.expand(*stacked.shape[:-1]))
        mixed = mix_sources(weights / schedule, stacked)
        if args:
            return (mixed, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": mixed}


@contextmanager
def wrap_routed(
    adapter: ModelAdapter, n_blocks: int, recency: float = DEFAULT_RECENCY
) -> Iterator[ModelAdapter]:
    """Within the block, ``adapter``'s model runs routed; yields an adapter that also has the
    ``route_attn``/``route_mlp`` sites (its provenance records the wrap)."""
    check_blocks(adapter.n_layers, n_blocks)
    if not math.isfinite(recency):
        raise NnobsError(f"the recency bias must be a finite number, got {recency!r}")
    norms = _sublayer_norms(adapter)
    per_block = adapter.n_layers // n_blocks
    written: list[torch.Tensor] = []

    def start(value: torch.Tensor) -> torch.Tensor:
        written[:] = [value]
        return value

    def record(value: torch.Tensor) -> torch.Tensor:
        written.append(value)
        return value

    records = {f"blocks.{l}.{s}_out": record for l in range(adapter.n_layers) for s in SUBLAYERS}
    routes: dict[str, _Router] = {}
    handles = []
    try:
        for layer, pair in enumerate(norms):
            for i, (norm, sub) in enumerate(zip(pair, SUBLAYERS, strict=True)):
                router = _Router(written, 2 * layer + i, per_block, recency)
                routes[f"blocks.{layer}.route_{sub}"] = router
                handles.append(norm.register_forward_pre_hook(router, with_kwargs=True))
        sites = {**adapter.sites, **{name: Site(r.hook) for name, r in routes.items()}}
        wrapped = dataclasses.replace(
            adapter,
            sites=sites,
            provenance={
                **adapter.provenance,
                "routing": {"kind": "wrapped", "blocks": n_blocks, "recency": recency},
            },
        )
        with adapter.hooks(edits={"embed": start, **records}):
            yield wrapped
    finally:
        for handle in handles:
            handle.remove()
