"""The persistence analysis, fixed before any data: gap curves, one decay model, verdicts.

For a comparison (e.g. *seeded with the auxiliary task* minus *random init*) the gap of
training seed ``k`` at checkpoint ``t`` and layer ``l`` is the difference of the two
conditions' probe scores for that seed (seeds are paired: the same seed initialises the new
units of a seeded model and the whole random-init model, and every run sees the same data
order). Everything below is over seeds, the source of variance the question is about.

- **Gap per checkpoint**: the mean over seeds, with a seed-level bootstrap interval.
- **The decay model** (the only one a verdict uses): ``gap(t) = a + b·exp(−t/τ)``, least
  squares on the mean gap curve, ``τ`` profiled over a log grid from a tenth of the first
  checkpoint step to ten times the last (so the fit never fails), ``a`` the asymptote.
  Its interval resamples seeds and refits. A power law ``a + b·(1 + t/t₁)^(−c)`` and the mean
  gap over the last third of the checkpoints are reported as sensitivity only.
- **Early gap**: the mean gap over the checkpoints after step 0 up to a tenth of training
  (at least the first one).
- **Verdict** per layer, at ``confidence`` (default 95%, per layer, not corrected over
  layers): *persists* if the asymptote's interval lies above 0; else *decays* if the early
  gap's interval lies above 0; else *absent*.

Intervals are expanded percentile bootstrap intervals (Hesterberg 2015): the percentile
interval's tails are moved out to the level ``Φ(−√(n/(n−1))·t_{n−1})`` so that, with the
handful of seeds a training study has, they keep close to their stated coverage (a plain
percentile interval over 5 seeds covers about 85% for a stated 95%).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import stats

from nnobs.core.errors import NnobsError

DECAY_MODEL = "exponential"
SENSITIVITY_MODELS = ("power", "late_mean")
VERDICTS = ("persists", "decays", "absent")
EARLY_FRACTION = 0.1
GRID = 48  # values of tau (or of the power-law exponent) profiled


def expanded_percentiles(n_seeds: int, confidence: float) -> tuple[float, float]:
    """The percentiles (0-100) a bootstrap over ``n_seeds`` seeds reads its interval at."""
    if n_seeds < 2:
        raise NnobsError(f"an interval over seeds needs at least 2 seeds, got {n_seeds}")
    t = stats.t.ppf(1 - (1 - confidence) / 2, n_seeds - 1)
    tail = stats.norm.cdf(-np.sqrt(n_seeds / (n_seeds - 1)) * t)
    return 100 * tail, 100 * (1 - tail)


def _profile_fit(
    steps: np.ndarray, curves: np.ndarray, basis: Callable, grid: np.ndarray
) -> np.ndarray:
    """Least squares of ``a + b·basis(steps, g)`` for each curve (columns of ``curves``),
    ``g`` the grid value with the smallest squared error: the asymptotes ``a``. Closed form
    for all grid values and curves at once (a line in the basis)."""
    x = np.stack([basis(steps, g) for g in grid])  # grid × checkpoints
    x_mean = x.mean(1)
    x_c = x - x_mean[:, None]
    var = (x_c**2).sum(1)
    flat = var <= 1e-12 * len(steps)  # a basis constant over the checkpoints: b is 0
    cov = x_c @ curves  # grid × curves
    slope = np.where(flat[:, None], 0.0, cov / np.where(flat, 1.0, var)[:, None])
    explained = slope * cov  # the squared error each grid value removes
    best = explained.argmax(0)
    cols = np.arange(curves.shape[1])
    return curves.mean(0) - slope[best, cols] * x_mean[best]


def fit_asymptotes(steps: np.ndarray, curves: np.ndarray, model: str) -> np.ndarray:
    """The asymptote of ``model`` fitted to each column of ``curves`` (checkpoints × n)."""
    steps = np.asarray(steps, np.float64)
    positive = steps[steps > 0]
    if len(steps) < 3 or not len(positive):
        raise NnobsError("a decay model needs at least 3 checkpoints, one after step 0")
    if model == "exponential":
        grid = np.geomspace(positive.min() / 10, steps.max() * 10, GRID)
        return _profile_fit(steps, curves, lambda t, tau: np.exp(-t / tau), grid)
    if model == "power":
        t1 = positive.min()
        grid = np.geomspace(0.05, 5.0, GRID)
        return _profile_fit(steps, curves, lambda t, c: (1 + t / t1) ** -c, grid)
    if model == "late_mean":
        return curves[-max(1, len(steps) // 3) :].mean(0)
    raise NnobsError(f"unknown decay model {model!r}")


def early_window(steps: np.ndarray) -> np.ndarray:
    """Which checkpoints the early gap averages: after step 0, up to a tenth of training
    (at least the first one after step 0)."""
    steps = np.asarray(steps)
    early = (steps > 0) & (steps <= EARLY_FRACTION * steps.max())
    if not early.any():
        early = steps == steps[steps > 0].min()
    return early


def analyse_gap(
    gaps: np.ndarray,
    steps: np.ndarray,
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """The pre-declared analysis of one layer's gap curves, ``gaps`` (seeds × checkpoints)."""
    gaps = np.asarray(gaps, np.float64)
    if gaps.ndim != 2 or gaps.shape[1] != len(steps):
        raise NnobsError(f"gaps must be seeds x {len(steps)} checkpoints, got {gaps.shape}")
    if not np.isfinite(gaps).all():
        raise NnobsError("a gap is not finite: a probe score is missing")
    n = len(gaps)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_boot, n))
    boot_curves = gaps[draws].mean(1).T  # checkpoints × n_boot
    lo_pct, hi_pct = expanded_percentiles(n, confidence)

    def interval(values: np.ndarray) -> list[float]:
        return [float(v) for v in np.percentile(values, [lo_pct, hi_pct], axis=-1)]

    mean_curve = gaps.mean(0)
    early = early_window(steps)
    early_ci = interval(boot_curves[early].mean(0))
    models = {}
    for model in (DECAY_MODEL, *SENSITIVITY_MODELS):
        point = fit_asymptotes(steps, mean_curve[:, None], model)[0]
        models[model] = {
            "asymptote": float(point),
            "ci": interval(fit_asymptotes(steps, boot_curves, model)),
        }
    decl = models[DECAY_MODEL]["ci"]
    verdict = "persists" if decl[0] > 0 else "decays" if early_ci[0] > 0 else "absent"
    lows, highs = np.percentile(boot_curves, [lo_pct, hi_pct], axis=1)
    return {
        "gap": mean_curve.tolist(),
        "gap_ci": [lows.tolist(), highs.tolist()],
        "per_seed": gaps.tolist(),
        "early_gap": float(mean_curve[early].mean()),
        "early_ci": early_ci,
        "asymptote": models[DECAY_MODEL]["asymptote"],
        "asymptote_ci": decl,
        "sensitivity": {m: models[m] for m in SENSITIVITY_MODELS},
        "verdict": verdict,
    }


def analyse(
    scores: dict[str, np.ndarray],
    steps: np.ndarray,
    comparisons: dict[str, tuple[str, str]],
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Every comparison ``name: (condition, baseline)`` at every layer; ``scores`` holds one
    array (seeds × checkpoints × layers) per condition, seeds paired by index."""
    out = {}
    for name, (condition, baseline) in comparisons.items():
        a, b = np.asarray(scores[condition]), np.asarray(scores[baseline])
        if a.shape != b.shape:
            raise NnobsError(f"{condition} scores {a.shape} and {baseline} {b.shape} differ")
        out[name] = {
            "condition": condition,
            "baseline": baseline,
            "layers": [
                analyse_gap(
                    a[:, :, layer] - b[:, :, layer],
                    steps,
                    n_boot=n_boot,
                    confidence=confidence,
                    seed=seed,
                )
                for layer in range(a.shape[2])
            ],
        }
    return out
