"""Stated results from per-document routing measures, with bootstrap intervals over documents.

Every number here is a mean over documents with a percentile interval from resampling whole
documents. The verdicts:

- **rank correlation** of mass and causal effect (mask, change in loss) across cells: tracks
  when its interval lies above zero, inverse when below, else not shown;
- **dissociation** per sublayer: the family with the largest mass is not the one with the
  largest effect, and the effect gap between them has an interval above zero;
- **mass without effect**: a cell with mean mass at least ``min_mass`` whose masking effect
  interval contains zero;
- **motifs** per sublayer × band: the family it depends on (largest masking effect; clear when
  the gap to the runner-up has an interval above zero), and the published motifs (embedding →
  early MLP; current block → early attention and MLP; older history → late attention) checked
  as present (effect interval above zero) and dominant.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

from nnobs.core.errors import NnobsError
from nnobs.measure.stats import percentile_interval

MEASURES = ("mass", "mask_loss", "mask_kl", "fix_loss", "fix_kl")
# (family, sublayer, band) of the motifs the Block AttnRes study reports for a trained model.
PUBLISHED_MOTIFS = (
    ("embedding", "mlp", "early"),
    ("current", "attn", "early"),
    ("current", "mlp", "early"),
    ("history", "attn", "late"),
)


def replicate_means(per_doc: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means over ``n_boot`` resamples of documents (axis 0): (n_boot, *per_doc.shape[1:])."""
    n = len(per_doc)
    if n < 2:
        raise NnobsError(f"intervals over documents need at least 2 documents, got {n}")
    if n_boot < 2:
        raise NnobsError(f"n_boot must be at least 2, got {n_boot}")
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_boot, n))
    np.add.at(counts, (np.arange(n_boot)[:, None], rng.integers(0, n, (n_boot, n))), 1)
    flat = np.nan_to_num(per_doc.reshape(n, -1))
    return (counts @ flat / n).reshape(n_boot, *per_doc.shape[1:])


def _interval(replicates: np.ndarray) -> list[float]:
    return list(percentile_interval(replicates))


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of ``x`` with the same row of ``y`` (NaN if constant)."""
    rx, ry = rankdata(x, axis=-1), rankdata(y, axis=-1)
    rx, ry = rx - rx.mean(-1, keepdims=True), ry - ry.mean(-1, keepdims=True)
    denom = np.sqrt((rx**2).sum(-1) * (ry**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (rx * ry).sum(-1) / denom, np.nan)


def rank_correlation(mass: np.ndarray, effect: np.ndarray, n_boot: int, seed: int) -> dict:
    """Spearman of cell mass against cell effect (per-document arrays, documents × cells)."""
    both = replicate_means(np.stack([mass, effect], axis=-1), n_boot, seed)
    point = float(spearman_rows(mass.mean(0), effect.mean(0)))
    reps = spearman_rows(both[..., 0], both[..., 1])
    lo, hi = _interval(reps)
    verdict = "tracks" if lo > 0 else "inverse" if hi < 0 else "not shown"
    return {"spearman": point, "ci95": [lo, hi], "verdict": verdict, "n_cells": mass.shape[1]}


def _gap(reps: np.ndarray, a: int, b: int) -> list[float]:
    return _interval(reps[:, a] - reps[:, b])


def dissociation(
    mass: np.ndarray, effect: np.ndarray, groups: Sequence[Sequence[int]], labels: Sequence[str],
    names: Sequence[str], n_boot: int, seed: int,
) -> list[dict]:  # fmt: skip
    """Per group of cells (one sublayer): is the largest-mass cell the largest-effect one?"""
    reps = replicate_means(effect, n_boot, seed)
    out = []
    for label, cells in zip(labels, groups, strict=True):
        cells = list(cells)
        top_mass = cells[int(np.argmax(mass.mean(0)[cells]))]
        top_effect = cells[int(np.argmax(effect.mean(0)[cells]))]
        gap = [0.0, 0.0] if top_mass == top_effect else _gap(reps, top_effect, top_mass)
        verdict = (
            "same cell"
            if top_mass == top_effect
            else "dissociates"
            if gap[0] > 0
            else "not separable"
        )
        out.append({
            "sublayer": label, "largest_mass": names[top_mass], "largest_effect": names[top_effect],
            "effect_gap_ci95": gap, "verdict": verdict,
        })  # fmt: skip
    return out


def mass_without_effect(
    mass: np.ndarray, effect: np.ndarray, names: Sequence[str], n_boot: int, seed: int,
    min_mass: float = 0.1,
) -> list[dict]:  # fmt: skip
    """Cells with mean mass ≥ ``min_mass`` whose effect interval contains zero."""
    reps = replicate_means(effect, n_boot, seed)
    found = []
    for c, name in enumerate(names):
        lo, hi = _interval(reps[:, c])
        if mass[:, c].mean() >= min_mass and lo <= 0 <= hi:
            found.append({"cell": name, "mass": float(mass[:, c].mean()), "effect_ci95": [lo, hi]})
    return found


def motifs(
    effect: np.ndarray, keys: Sequence[tuple[str, str, str]], bands: Sequence[str],
    n_boot: int, seed: int,
) -> dict:  # fmt: skip
    """Which family each sublayer × band depends on, and the published motifs checked."""
    reps = replicate_means(effect, n_boot, seed)
    depends = []
    for sub in ("attn", "mlp"):
        for band in bands:
            cells = [c for c, (_, s, b) in enumerate(keys) if s == sub and b == band]
            if not cells:
                continue
            order = sorted(cells, key=lambda c: -effect[:, c].mean())
            gap = _gap(reps, order[0], order[1]) if len(order) > 1 else None
            depends.append({
                "sublayer": sub, "band": band, "family": keys[order[0]][0],
                "gap_to_next_ci95": gap, "clear": gap is None or gap[0] > 0,
            })  # fmt: skip
    band_of = {"early": bands[0], "late": bands[-1]}
    published = []
    for family, sub, band in PUBLISHED_MOTIFS:
        key = (family, sub, band_of[band])
        if key not in keys:
            published.append({"motif": f"{family} -> {band} {sub}", "status": "no such source"})
            continue
        c = list(keys).index(key)
        lo, hi = _interval(reps[:, c])
        top = next(d for d in depends if (d["sublayer"], d["band"]) == key[1:])
        dominant = top["family"] == family and top["clear"]
        status = "dominant" if lo > 0 and dominant else "present" if lo > 0 else "not shown"
        published.append(
            {"motif": f"{family} -> {band} {sub}", "effect_ci95": [lo, hi], "status": status}
        )
    return {"depends_on": depends, "published": published}


def cell_summaries(per_doc: np.ndarray, n_boot: int, seed: int) -> list[dict]:
    """Mean and interval of every measure of every cell (per_doc: documents × cells × MEASURES)."""
    reps = replicate_means(per_doc, n_boot, seed)
    rows = []
    for c in range(per_doc.shape[1]):
        row = {}
        for m, measure in enumerate(MEASURES):
            values = per_doc[:, c, m]
            if np.isnan(values).all():
                row[measure], row[f"{measure}_ci95"] = None, None
                continue
            row[measure] = float(np.nanmean(values))
            row[f"{measure}_ci95"] = _interval(reps[:, c, m])
        rows.append(row)
    return rows
