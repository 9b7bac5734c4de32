"""Observability collapse: a signal that formed over training and was later erased while the
validation loss kept improving, judged as tests against a random-init null.

Input, per series (the run's headline at its best layer, or one layer of the profile): one
value per saved checkpoint with its standard deviation (from the value's bootstrap interval),
and the null: the same statistic on a random-init model of the architecture (the run's step-0
checkpoint, or a fresh initialisation) with its standard deviation. With ``m`` checkpoints and
test level ``α``:

1. **Formed**: some checkpoint is above the null, ``z = (v - null) / sqrt(sd² + sd_null²)``
   above the one-sided ``1 - α/m`` normal quantile (Bonferroni over the checkpoints, so a
   trajectory that only wanders around the null forms with probability at most α); the first
   such checkpoint is ``formed_step``.
2. **Peak**: the checkpoint at or after ``formed_step`` with the largest value.
3. **Still there**: the last checkpoint is above the null at level α → *retained*.
4. **Fell**: otherwise, if the last value is below the peak by more than the ``1 - α/m``
   quantile of their difference's standard deviation, the signal fell; ``collapse_step`` is
   the first checkpoint of the final run of checkpoints not above the null.
5. **Erased** (the collapse): it fell while the validation loss kept improving (the loss at
   ``collapse_step`` and at the end no higher than at the peak, plus ``loss_tolerance``);
   ``fell_with_loss`` when the loss got worse (overfitting or divergence, not a trade-off).
   A signal that formed, is not above the null at the end, but whose fall from the peak is
   within the noise is *inconclusive*: neither kept nor shown to be gone.

A step-0 checkpoint is a random-init model and is judged like any other checkpoint; it is
the null itself when it is the null's source, so it cannot form.

The run's verdict is the headline series' verdict; ``erased_layers`` lists the layers of the
profile whose own series was erased (the profile's values come from one probe on the
validation split: their intervals cover its documents, not the probe's training).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import norm

from nnobs.core.errors import NnobsError
from nnobs.measure.stats import as_vector

VERDICTS = ("retained", "erased", "fell_with_loss", "inconclusive", "never_formed")


def sd_from_interval(low: float, high: float, confidence: float = 0.95) -> float:
    """The standard deviation a normal interval of that width implies."""
    return max(0.0, (high - low) / (2 * norm.isf((1 - confidence) / 2)))


def _series(name: str, values: Sequence[float] | float, n: int) -> np.ndarray:
    values = np.full(n, values, dtype=np.float64) if np.ndim(values) == 0 else values
    return as_vector(name, values, n)


def series_verdict(
    steps: np.ndarray,
    loss: np.ndarray,
    value: np.ndarray,
    sd: np.ndarray,
    null: tuple[float, float],
    level: float,
    loss_tolerance: float,
) -> dict[str, Any]:
    """The verdict of one series (module docstring)."""
    null_mean, null_sd = null
    m = len(steps)
    z = (value - null_mean) / np.sqrt(np.maximum(sd**2 + null_sd**2, 1e-300))
    formed_at, kept_at = norm.isf(level / m), norm.isf(level)
    out: dict[str, Any] = dict.fromkeys(
        ("formed_step", "peak_step", "peak_pcorr", "collapse_step", "loss_at_peak")
    )
    out.update(
        verdict="never_formed",
        reason="",
        final_pcorr=float(value[-1]),
        final_z=float(z[-1]),
        loss_at_collapse=None,
        floor=float(null_mean + kept_at * null_sd),
    )
    above = np.flatnonzero(z > formed_at)
    if len(above) == 0:
        best = int(np.argmax(z))
        out["reason"] = (
            f"never above the null: best {value[best]:+.3f} at step {int(steps[best])}, "
            f"z = {z[best]:.2f} < {formed_at:.2f} (null {null_mean:+.3f}, level {level:g} "
            f"over {m} checkpoints)"
        )
        return out
    formed = int(above[0])
    peak = formed + int(np.argmax(value[formed:]))
    out.update(
        formed_step=int(steps[formed]),
        peak_step=int(steps[peak]),
        peak_pcorr=float(value[peak]),
        loss_at_peak=float(loss[peak]),
    )
    if z[-1] > kept_at:
        out["verdict"] = "retained"
        out["reason"] = (
            f"formed at step {out['formed_step']}, peak {value[peak]:+.3f} at step "
            f"{out['peak_step']}, still above the null at the end: {value[-1]:+.3f} "
            f"(z = {z[-1]:.2f})"
        )
        return out
    drop = (value[peak] - value[-1]) / np.sqrt(max(sd[peak] ** 2 + sd[-1] ** 2, 1e-300))
    if drop <= formed_at:
        out["verdict"] = "inconclusive"
        out["reason"] = (
            f"formed at step {out['formed_step']} (peak {value[peak]:+.3f}); at the end "
            f"{value[-1]:+.3f} is not above the null (z = {z[-1]:.2f}), but its fall from the "
            f"peak is within the noise (z = {drop:.2f} < {formed_at:.2f})"
        )
        return out
    not_above = z <= kept_at
    fell = len(not_above) - int(np.argmin(not_above[::-1]))
    out.update(collapse_step=int(steps[fell]), loss_at_collapse=float(loss[fell]))
    worst_after = max(loss[fell], loss[-1])
    if worst_after <= loss[peak] + loss_tolerance:
        out["verdict"] = "erased"
        out["reason"] = (
            f"peak {value[peak]:+.3f} at step {out['peak_step']} fell to the null's level "
            f"({value[-1]:+.3f} at the end, null {null_mean:+.3f}; fall z = {drop:.2f}) by "
            f"step {out['collapse_step']} while validation loss improved "
            f"{loss[peak]:.4f} -> {loss[fell]:.4f}"
        )
    else:
        out["verdict"] = "fell_with_loss"
        out["reason"] = (
            f"fell to the null's level by step {out['collapse_step']}, but validation loss "
            f"rose {loss[peak]:.4f} -> {worst_after:.4f} after the peak (overfitting or "
            "divergence), so this is not a collapse"
        )
    return out


def detect_collapse(
    steps: Sequence[int],
    val_loss: Sequence[float],
    series: Mapping[Hashable, tuple[Sequence[float], Sequence[float]]],
    null: Mapping[Hashable, tuple[float, float]],
    headline: Hashable,
    *,
    level: float = 0.05,
    loss_tolerance: float = 0.0,
) -> dict[str, Any]:
    """Verdicts for one training run (the rule is in the module docstring).

    ``series`` maps a name (``headline`` for the run's best-layer signal, layer indices for the
    profile) to (values, standard deviations), one per checkpoint aligned with ``steps``;
    ``null`` maps the same names to the random-init (value, standard deviation). Returns plain
    data: the headline's ``verdict``, ``reason``, ``collapse_step``, ``peak_step``, the
    ``erased_layers`` and each series' record under ``layers``.
    """
    s = np.asarray(steps)
    n = len(s)
    if s.ndim != 1 or n < 2:
        raise NnobsError(f"collapse detection needs at least 2 checkpoints, got {n}")
    if not np.issubdtype(s.dtype, np.integer) or np.any(np.diff(s) <= 0):
        raise NnobsError("steps must be integers in increasing order, one per checkpoint")
    loss = _series("val_loss", val_loss, n)
    if headline not in series:
        raise NnobsError(f"the headline series {headline!r} is missing")
    if set(null) != set(series):
        raise NnobsError("null must give one (value, sd) per series")
    if loss_tolerance < 0:
        raise NnobsError(f"loss_tolerance must be >= 0, got {loss_tolerance}")
    if not 0 < level < 0.5:
        raise NnobsError(f"level must be in (0, 0.5), got {level}")
    records = {}
    for name, (values, sds) in series.items():
        v = _series(f"values[{name!r}]", values, n)
        sd = _series(f"sd[{name!r}]", sds, n)
        if np.any(sd < 0):
            raise NnobsError(f"sd[{name!r}] has negative values")
        null_mean, null_sd = null[name]
        records[name] = {
            "layer": name,
            **series_verdict(s, loss, v, sd, (null_mean, null_sd), level, loss_tolerance),
        }
    top = records[headline]
    erased = [r for name, r in records.items() if name != headline and r["verdict"] == "erased"]
    return {
        "verdict": top["verdict"],
        "reason": top["reason"] or "",
        "layer": top["layer"] if top["verdict"] == "erased" else None,
        "collapse_step": top["collapse_step"],
        "peak_step": top["peak_step"],
        "headline": top,
        "erased_layers": [r["layer"] for r in sorted(erased, key=lambda r: -r["peak_pcorr"])],
        "layers": [r for name, r in records.items() if name != headline],
        "settings": {"level": level, "loss_tolerance": loss_tolerance, "test": "z vs null"},
        "steps": [int(x) for x in s],
    }
