"""Which features make up the decision-quality probe's direction.

The probe of an ``nnobs observe`` result scores a token by ``p · h`` at its site. A feature
that writes ``d_i`` into the residual stream (an SAE decoder row, an MLP neuron's output
weights, a principal component) contributes ``a_i · (d_i · p)`` to that score, so two
rankings name its make-up: by cosine between ``d_i`` and ``p`` (what the feature's direction
shares with the probe's) and by attribution, the feature's mean contribution to the score
over the corpus (``mean(a_i) · (d_i · p)``: a feature aligned with the probe but rarely active
contributes little). Both need the feature to write into the stream the probe reads: a
feature at or before the probe's layer.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from nnobs.core.errors import NnobsError
from nnobs.features.sources import FeatureSource, stream_directions
from nnobs.models.adapter import ModelAdapter
from nnobs.models.sites import LAYER_SITE_KINDS


def _order(site: str) -> tuple[int, int]:
    """Where a site is in the forward pass: (layer, place within the block)."""
    match = re.fullmatch(r"blocks\.(\d+)\.(\w+)", site)
    if match:
        kind = match.group(2)
        place = LAYER_SITE_KINDS.index(kind) if kind in LAYER_SITE_KINDS else 0
        return int(match.group(1)), place
    return (-1, 0) if site == "embed" else (10**9, 0)


def check_reaches(site: str, probe_site: str) -> None:
    """Refuse features that come after the probe's site: they cannot make up its input."""
    if _order(site) > _order(probe_site):
        raise NnobsError(
            f"features at {site} come after the probe's site {probe_site}: "
            "decompose the probe with features at or before its layer"
        )


def probe_contributors(
    adapter: ModelAdapter,
    source: FeatureSource,
    means: np.ndarray,
    probe_site: str,
    direction: np.ndarray,
    n: int = 10,
) -> dict[str, Any]:
    """The ``n`` features whose stream directions are closest to the probe direction (by
    absolute cosine) and the ``n`` that contribute most to its score (by absolute mean
    contribution); refused when the source's features cannot reach the probe's site."""
    check_reaches(source.site, probe_site)
    dirs = stream_directions(adapter, source)
    if dirs is None:
        raise NnobsError(f"what features at {source.site} write into the stream is not known")
    p = torch.as_tensor(np.asarray(direction, dtype=np.float32))
    if dirs.shape[1] != len(p):
        raise NnobsError(f"the probe is {len(p)} wide, the stream {dirs.shape[1]}: another model")
    p = p / p.norm()
    dots = (dirs @ p).numpy()
    cosine = dots / np.maximum(dirs.norm(dim=1).numpy(), 1e-12)
    attribution = np.asarray(means, dtype=np.float64) * dots

    def ranked(values: np.ndarray) -> list[dict[str, Any]]:
        order = np.argsort(-np.abs(values), kind="stable")[:n]
        return [
            {"index": int(i), "cosine": float(cosine[i]), "attribution": float(attribution[i])}
            for i in order
        ]

    return {
        "probe_site": probe_site,
        "by_cosine": ranked(cosine),
        "by_attribution": ranked(attribution),
        "total_attribution": float(attribution.sum()),
    }
