"""The routing analysis of one or more models as one result document (``nnobs.routing``).

A model with its own routing (``residual="attnres"``) is analysed as it is; a vanilla model is
wrapped (:func:`~nnobs.routing.wrap.wrap_routed`) with ``wrap_blocks`` blocks, and its entry
also records the wrap's exactness: the largest logit difference from the unwrapped model and
how far the weights stray from the schedule.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch

from nnobs.core.errors import NnobsError
from nnobs.core.results import software_provenance
from nnobs.data.windows import Windows
from nnobs.models.adapter import ModelAdapter, provenance
from nnobs.routing.analysis import band_names, measure_routing, routing_cells
from nnobs.routing.verdicts import (
    MEASURES,
    cell_summaries,
    dissociation,
    mass_without_effect,
    motifs,
    rank_correlation,
)
from nnobs.routing.wrap import DEFAULT_RECENCY, recency_weights, routing_blocks, wrap_routed

SCHEMA = "nnobs.routing"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class RoutingSettings:
    """What a routing analysis measures on and how its intervals are drawn."""

    corpus: str = "stdlib"
    split: str = "validation"
    windows: int = 32
    window_len: int = 64
    bands: int = 2
    n_boot: int = 1000
    seed: int = 0
    batch_size: int = 16
    min_mass: float = 0.1
    wrap_blocks: int | None = None
    recency: float = DEFAULT_RECENCY


def _is_routed(adapter: ModelAdapter) -> bool:
    try:
        routing_blocks(adapter)
    except NnobsError:
        return False
    return True


def _first_ids(adapter: ModelAdapter, windows: Windows) -> torch.Tensor:
    return torch.as_tensor(windows.input_ids[:8]).to(adapter.device)


def _wrap_check(routed: ModelAdapter, ids: torch.Tensor, plain: torch.Tensor) -> dict:
    """How exactly the wrap reproduces the vanilla model's logits ``plain`` on ``ids``, and
    how far its weights stray from the schedule."""
    recency = routed.provenance["routing"]["recency"]
    sites = [name for name in routed.sites if ".route_" in name]
    logits, cache = routed.run_with_cache(ids, sites)
    errors = [
        (cache[s].cpu().double() - recency_weights(cache[s].shape[-1], recency)).abs().max()
        for s in sites
    ]
    return {
        "max_logit_diff": float((logits - plain).abs().max()),
        "max_schedule_error": float(max(errors)),
    }


def analyse_model(
    adapter: ModelAdapter, label: str, windows: Windows, settings: RoutingSettings, progress: bool
) -> dict:
    """One model's entry of the result: cells with intervals and the stated verdicts."""
    wrap = None if _is_routed(adapter) else settings.wrap_blocks
    if wrap is None:
        routing_blocks(adapter)  # a vanilla model without --wrap-blocks: refused, named
        context, plain = nullcontext(adapter), None
    else:
        with torch.no_grad():
            plain = adapter.forward(_first_ids(adapter, windows))
        context = wrap_routed(adapter, wrap, settings.recency)
    with context as routed:
        cells = routing_cells(routed, settings.bands)
        per_doc, stds = measure_routing(routed, windows, cells, settings.batch_size, progress)
        check = None if plain is None else _wrap_check(routed, _first_ids(adapter, windows), plain)
        routing = dict(routed.provenance.get("routing") or {"kind": "attnres"})
        routing.setdefault("blocks", routing_blocks(routed))
    names = [f"{c.family} / {c.sublayer} / {c.band}" for c in cells]
    keys = [(c.family, c.sublayer, c.band) for c in cells]
    boot = {"n_boot": settings.n_boot, "seed": settings.seed}
    rows = cell_summaries(per_doc, **boot)
    usable = [c for c in range(len(cells)) if np.isfinite(per_doc[:, c, 1]).all()]
    mass, effect = per_doc[:, usable, 0], per_doc[:, usable, 1]
    use_names, use_keys = [names[c] for c in usable], [keys[c] for c in usable]
    groups = [[i for i, k in enumerate(use_keys) if k[1] == sub] for sub in ("attn", "mlp")]
    entry = {
        "label": label,
        "provenance": provenance(adapter),
        "routing": routing,
        "n_documents": int(len(per_doc)),
        "max_weight_std": max(float(s.max()) for s in stds.values()),
        "cells": [
            {
                "family": c.family,
                "sublayer": c.sublayer,
                "band": c.band,
                "sites": sorted(c.sources),
                **row,
            }
            for c, row in zip(cells, rows, strict=True)
        ],
        "rank_correlation": rank_correlation(mass, effect, **boot),
        "dissociation": dissociation(mass, effect, groups, ["attn", "mlp"], use_names, **boot),
        "mass_without_effect": mass_without_effect(
            mass, effect, use_names, min_mass=settings.min_mass, **boot
        ),
        "motifs": motifs(effect, use_keys, band_names(settings.bands), **boot),
    }
    if check is not None:
        entry["wrap_check"] = check
    return entry


def routing_document(entries: list[dict], settings: RoutingSettings, windows_info: dict) -> dict:
    """The result document for the analysed models."""
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "kind": "routing",
        "provenance": software_provenance(),
        "settings": {**asdict(settings), "measures": list(MEASURES)},
        "windows": windows_info,
        "models": entries,
    }
