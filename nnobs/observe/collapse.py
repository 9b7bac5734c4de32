"""Observability collapse: a signal that formed over training and was later erased while the
validation loss kept improving.

Input is a trajectory: per saved checkpoint, the validation loss and each layer's pcorr
(optionally the lower bound of its confidence interval), next to the detection floor (one
value, or one per checkpoint when it was re-measured along the run).

The rule, per layer, with checkpoints in step order:

1. **Formed**: the evidence, which is ``ci_low`` when given and the pcorr otherwise, exceeds
   ``floor + formed_margin`` at some checkpoint; the first such checkpoint is
   ``formed_step``. The margin keeps noise around the floor from counting as a signal: by
   default 0.02 on point estimates (about two standard errors of a pcorr at the default
   token budget) and 0 with ``ci_low``, whose interval already accounts for the noise.
2. **Peak**: the checkpoint at or after ``formed_step`` with the largest pcorr.
3. **Fell**: the pcorr is at or below the floor at the last checkpoint; ``collapse_step``
   is the first checkpoint of the final run of at-floor checkpoints, so a dip that recovered
   is not a collapse and the signal stayed at the floor from ``collapse_step`` to the end.
4. **Erased** (the collapse): it fell while the validation loss kept improving, i.e. the
   loss at ``collapse_step`` and at the last checkpoint is no higher than at the peak, plus
   ``loss_tolerance``. A signal that fell while the loss got worse is reported as
   ``fell_with_loss``: overfitting or divergence explains that, not a trade-off between the
   objective and observability.

Layer verdicts: ``never_formed``, ``retained`` (formed and above the floor at the end),
``erased``, ``fell_with_loss``. The run's verdict is about the signal at its best layer (the
layer profile's maximum): ``never_formed`` if no layer formed; ``retained`` if some formed
layer is still above the floor at the end; otherwise ``erased`` if some layer was erased,
and ``fell_with_loss`` if every formed layer fell with a worsening loss. ``erased_layers``
lists every erased layer even when the run as a whole retained a signal elsewhere.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from nnobs.core.errors import NnobsError
from nnobs.measure.stats import as_vector

VERDICTS = ("retained", "erased", "fell_with_loss", "never_formed")
# Two standard errors of a correlation near 0 on ~45k tokens (350 × 128) is ~0.01; 0.02 is
# conservative enough for the smaller budgets used in quick runs.
DEFAULT_FORMED_MARGIN = 0.02


def _series(name: str, values: Sequence[float] | float, n: int) -> np.ndarray:
    values = np.full(n, values, dtype=np.float64) if np.ndim(values) == 0 else values
    return as_vector(name, values, n)


def _layer_verdict(
    layer: Hashable,
    steps: np.ndarray,
    loss: np.ndarray,
    pcorr: np.ndarray,
    evidence: np.ndarray,
    floor: np.ndarray,
    margin: float,
    loss_tolerance: float,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "layer": layer,
        "verdict": "never_formed",
        "reason": "",
        "formed_step": None,
        "peak_step": None,
        "peak_pcorr": None,
        "collapse_step": None,
        "final_pcorr": float(pcorr[-1]),
        "loss_at_peak": None,
        "loss_at_collapse": None,
    }
    above = np.flatnonzero(evidence > floor + margin)
    if len(above) == 0:
        best = int(np.argmax(evidence))
        out["reason"] = (
            f"never above the floor + margin: best evidence {evidence[best]:.3f} at step "
            f"{int(steps[best])} vs {floor[best] + margin:.3f}"
        )
        return out
    formed = int(above[0])
    peak = formed + int(np.argmax(pcorr[formed:]))
    out.update(
        formed_step=int(steps[formed]),
        peak_step=int(steps[peak]),
        peak_pcorr=float(pcorr[peak]),
        loss_at_peak=float(loss[peak]),
    )
    at_floor = pcorr <= floor
    if not at_floor[-1]:
        out["verdict"] = "retained"
        out["reason"] = (
            f"formed at step {out['formed_step']}, peak {pcorr[peak]:.3f} at step "
            f"{out['peak_step']}, still {pcorr[-1]:.3f} > floor {floor[-1]:.3f} at the end"
        )
        return out
    # First checkpoint of the final run at the floor. It comes after the peak: the peak's
    # pcorr is at least the formation checkpoint's, which is above the floor.
    fell = len(at_floor) - int(np.argmin(at_floor[::-1]))
    out.update(collapse_step=int(steps[fell]), loss_at_collapse=float(loss[fell]))
    worst_after = max(loss[fell], loss[-1])
    if worst_after <= loss[peak] + loss_tolerance:
        out["verdict"] = "erased"
        out["reason"] = (
            f"peak {pcorr[peak]:.3f} at step {out['peak_step']} fell to the floor by step "
            f"{out['collapse_step']} while validation loss improved "
            f"{loss[peak]:.4f} -> {loss[fell]:.4f}"
        )
    else:
        out["verdict"] = "fell_with_loss"
        out["reason"] = (
            f"fell to the floor by step {out['collapse_step']}, but validation loss rose "
            f"{loss[peak]:.4f} -> {worst_after:.4f} after the peak (overfitting or "
            "divergence), so this is not a collapse"
        )
    return out


def detect_collapse(
    steps: Sequence[int],
    val_loss: Sequence[float],
    pcorr: Mapping[Hashable, Sequence[float]],
    floor: float | Sequence[float],
    ci_low: Mapping[Hashable, Sequence[float]] | None = None,
    formed_margin: float | None = None,
    loss_tolerance: float = 0.0,
) -> dict[str, Any]:
    """Per-layer and run verdicts for one training run (the rule is in the module docstring).

    ``pcorr`` (and ``ci_low``) map a layer (index or site name) to one value per checkpoint,
    aligned with ``steps``. ``formed_margin`` defaults to 0.02 on point estimates and 0 with
    ``ci_low``. ``loss_tolerance`` (in loss units) forgives a tiny loss increase after the
    peak, e.g. evaluation noise. Returns plain data: ``verdict``, ``reason``, ``layer`` and
    ``collapse_step`` (of the headline erased layer: the one with the highest peak),
    ``erased_layers``, ``layers`` (one dict per layer) and the settings used.
    """
    s = np.asarray(steps)
    n = len(s)
    if s.ndim != 1 or n < 2:
        raise NnobsError(f"collapse detection needs at least 2 checkpoints, got {n}")
    if not np.issubdtype(s.dtype, np.integer) or np.any(np.diff(s) <= 0):
        raise NnobsError("steps must be integers in increasing order, one per checkpoint")
    loss = _series("val_loss", val_loss, n)
    floors = _series("floor", floor, n)
    if not pcorr:
        raise NnobsError("pcorr is empty: give one pcorr trajectory per layer")
    if loss_tolerance < 0:
        raise NnobsError(f"loss_tolerance must be >= 0, got {loss_tolerance}")
    if ci_low is not None and set(ci_low) != set(pcorr):
        raise NnobsError("ci_low must have the same layers as pcorr")
    margin = formed_margin
    if margin is None:
        margin = 0.0 if ci_low is not None else DEFAULT_FORMED_MARGIN
    if margin < 0:
        raise NnobsError(f"formed_margin must be >= 0, got {margin}")

    layers = []
    for layer, values in pcorr.items():
        p = _series(f"pcorr[{layer!r}]", values, n)
        evidence = p if ci_low is None else _series(f"ci_low[{layer!r}]", ci_low[layer], n)
        if ci_low is not None and np.any(evidence > p):
            raise NnobsError(f"ci_low[{layer!r}] exceeds pcorr at some checkpoint: swapped?")
        layers.append(_layer_verdict(layer, s, loss, p, evidence, floors, margin, loss_tolerance))

    by = {v: [r for r in layers if r["verdict"] == v] for v in VERDICTS}
    erased = sorted(by["erased"], key=lambda r: -r["peak_pcorr"])
    headline: dict[str, Any] | None = None
    if by["retained"]:
        verdict = "retained"
        best = max(by["retained"], key=lambda r: r["final_pcorr"])
        reason = f"layer {best['layer']!r} keeps {best['final_pcorr']:.3f} at the end"
    elif erased:
        verdict, headline = "erased", erased[0]
        reason = f"layer {headline['layer']!r}: {headline['reason']}"
    elif by["fell_with_loss"]:
        verdict = "fell_with_loss"
        reason = "every formed layer fell to the floor while validation loss rose"
    else:
        verdict = "never_formed"
        reason = "no layer's signal rose above the detection floor"
    return {
        "verdict": verdict,
        "reason": reason,
        "layer": headline["layer"] if headline else None,
        "collapse_step": headline["collapse_step"] if headline else None,
        "peak_step": headline["peak_step"] if headline else None,
        "erased_layers": [r["layer"] for r in erased],
        "layers": layers,
        "settings": {
            "formed_margin": margin,
            "loss_tolerance": loss_tolerance,
            "evidence": "ci_low" if ci_low is not None else "pcorr",
        },
        "steps": [int(x) for x in s],
    }
