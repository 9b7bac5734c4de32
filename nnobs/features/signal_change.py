"""Did the decision-quality signal change between two models measured on the same tokens?

The observe headline of each model is the pcorr of its seed ensemble's score on the test
split. Its uncertainty has two sources (:func:`nnobs.observe.signal.headline_replicates`):
the test documents, and the probe's training documents (sampled by the seeds' deviations,
each seed a bootstrap resample of the training documents). The difference ``after − before``
is compared *paired*:

- test documents: each replicate draws one cluster bootstrap of the documents and scores both
  models on it (the same seed and documents give both the same resample weights), so what the
  two models share through their documents cancels out;
- probe training: each replicate adds, per model, the deviation of the same seed (the same
  resample of the training documents, which both models' probes read), scaled as the
  headline's replicates scale it.

The test of "changed" is two-sided at ``level``: the difference over the replicates' standard
deviation against a normal. The verdict: *fell* or *rose* when changed; *kept* when not, and
the (1 − level) interval lies inside ±``margin`` (a stated equivalence margin in pcorr);
*unclear* otherwise (the data cannot tell a small change from none).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import norm

from nnobs.core.errors import NnobsError
from nnobs.measure import stats
from nnobs.measure.nulltest import replicate_sd

KEPT_MARGIN = 0.05


@dataclass
class HeadlineInputs:
    """One model's headline inputs on the test split: the ensemble score, the loss and the
    standard controls per token, each token's document, and each seed's pcorr."""

    score: np.ndarray
    loss: np.ndarray
    covariates: np.ndarray
    documents: np.ndarray
    per_seed: Sequence[float]

    @property
    def value(self) -> float:
        """The headline: the ensemble score's pcorr under the controls."""
        return stats.partial_spearman(self.score, self.loss, self.covariates)

    def replicates(self, n_boot: int, seed: int) -> np.ndarray:
        """Cluster-bootstrap replicates over the test documents (resample ``seed``)."""
        return stats.partial_spearman_replicates(
            self.score, self.loss, self.covariates, n_boot=n_boot, seed=seed,
            groups=self.documents,
        )  # fmt: skip

    def seed_deviations(self) -> np.ndarray:
        """Each seed's deviation from the seeds' mean, scaled by sqrt(S / (S − 1))."""
        values = np.asarray(self.per_seed, dtype=np.float64)
        if len(values) < 2:
            raise NnobsError("the probe-training spread needs at least 2 seeds")
        return (values - values.mean()) * np.sqrt(len(values) / (len(values) - 1))


def check_change_settings(level: float, margin: float) -> None:
    """Refuse a test level outside (0, 0.5) or a negative kept margin."""
    if not 0 < level < 0.5:
        raise NnobsError(f"level must be in (0, 0.5), got {level}")
    if margin < 0:
        raise NnobsError(f"the kept margin must be >= 0, got {margin}")


def change_verdict(
    changed: bool, difference: float, interval: Sequence[float], margin: float
) -> str:
    """``fell``/``rose`` when changed; ``kept`` when the interval lies inside ±margin;
    ``unclear`` otherwise."""
    if changed:
        return "fell" if difference < 0 else "rose"
    return "kept" if -margin <= interval[0] and interval[1] <= margin else "unclear"


def paired_change(
    before: HeadlineInputs,
    after: HeadlineInputs,
    *,
    n_boot: int = 1000,
    level: float = 0.05,
    margin: float = KEPT_MARGIN,
    seed: int = 0,
) -> dict[str, Any]:
    """The difference of the two headlines (after − before), its (1 − level) interval over the
    test documents (paired) and the probes' training (seed spread), the two-sided p-value of
    "changed", and the verdict (module docstring)."""
    check_change_settings(level, margin)
    if not np.array_equal(before.documents, after.documents):
        raise NnobsError("a paired comparison needs both models measured on the same tokens")
    if len(before.per_seed) != len(after.per_seed):
        raise NnobsError("both models' probes need the same seeds to pair their training")
    test_part = after.replicates(n_boot, seed) - before.replicates(n_boot, seed)
    pick = np.random.default_rng(seed + 1).integers(0, len(before.per_seed), n_boot)
    training_part = after.seed_deviations()[pick] - before.seed_deviations()[pick]
    replicates = test_part + training_part
    difference = after.value - before.value
    sd = replicate_sd(replicates)
    p_value = float(2 * norm.sf(abs(difference) / sd)) if sd > 0 else float(difference == 0)
    interval = list(stats.percentile_interval(replicates, 1 - level))
    changed = bool(p_value < level)
    return {
        "before": before.value,
        "after": after.value,
        "difference": difference,
        "interval": interval,
        "confidence": 1 - level,
        "sd": sd,
        "p_value": p_value,
        "level": level,
        "changed": changed,
        "margin": margin,
        "verdict": change_verdict(changed, difference, interval, margin),
        "n_boot": n_boot,
        "undefined_resamples": int(np.isnan(replicates).sum()),
        "interval_over": "test documents (paired) and the probes' training documents (seeds)",
    }
