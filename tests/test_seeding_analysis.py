"""The persistence analysis on simulated gap curves whose truth is known: a planted
persistent gap is called persists, a decaying one decays, none absent, and the false-call
rates over many simulated studies stay near the stated level."""

from __future__ import annotations

import numpy as np
import pytest

from nnobs.core.errors import NnobsError
from nnobs.seeding.analysis import (
    analyse,
    analyse_gap,
    early_window,
    expanded_percentiles,
    fit_asymptotes,
)
from nnobs.training.schedule import checkpoint_steps

STEPS = np.array(checkpoint_steps(600, 8, 64))  # 0, 8, 16, 32, 64, 128, ..., 576, 600


def simulate(asymptote, amplitude, *, seeds=5, tau=60.0, seed_sd=0.01, point_sd=0.01, rng=0):
    """Gap curves (seeds × checkpoints): a + b·exp(−t/τ), a per-seed offset, point noise."""
    rng = np.random.default_rng(rng)
    curve = asymptote + amplitude * np.exp(-STEPS / tau)
    return curve + rng.normal(0, seed_sd, (seeds, 1)) + rng.normal(0, point_sd, (seeds, len(STEPS)))


def test_the_decay_model_recovers_a_noiseless_asymptote():
    for a, b, tau in ((0.05, 0.2, 40.0), (-0.02, 0.1, 300.0), (0.0, 0.0, 10.0)):
        curve = a + b * np.exp(-STEPS / tau)
        assert fit_asymptotes(STEPS, curve[:, None], "exponential")[0] == pytest.approx(a, abs=2e-3)
    assert fit_asymptotes(STEPS, np.full((len(STEPS), 1), 0.3), "late_mean")[0] == pytest.approx(
        0.3
    )


@pytest.mark.parametrize(
    ("asymptote", "amplitude", "verdict"),
    [(0.05, 0.15, "persists"), (0.0, 0.15, "decays"), (0.0, 0.0, "absent")],
)
def test_planted_truth_gets_its_verdict(asymptote, amplitude, verdict):
    result = analyse_gap(simulate(asymptote, amplitude, rng=1), STEPS)
    assert result["verdict"] == verdict
    lo, hi = result["asymptote_ci"]
    assert lo <= asymptote <= hi
    assert len(result["gap"]) == len(STEPS) and len(result["gap_ci"][0]) == len(STEPS)
    assert set(result["sensitivity"]) == {"power", "late_mean"}


def _calls(asymptote, amplitude, n=150, **kw):
    return [
        analyse_gap(simulate(asymptote, amplitude, rng=100 + i, **kw), STEPS, n_boot=600)["verdict"]
        for i in range(n)
    ]


def test_false_calls_stay_near_the_stated_level():
    # A gap that decays to nothing is rarely called persistent (nominal 2.5%: one-sided).
    decaying = _calls(0.0, 0.15)
    assert decaying.count("persists") / len(decaying) <= 0.08
    # No gap at all: neither persistent nor an early effect, beyond chance.
    null = _calls(0.0, 0.0)
    assert null.count("persists") / len(null) <= 0.08
    assert null.count("decays") / len(null) <= 0.08


def test_a_real_persistent_gap_is_found_most_of_the_time():
    calls = _calls(0.04, 0.15, n=60)
    assert calls.count("persists") / len(calls) >= 0.8


def test_intervals_widen_for_few_seeds_and_analyse_pairs_conditions_by_seed():
    lo3, hi3 = expanded_percentiles(3, 0.95)
    lo10, _ = expanded_percentiles(10, 0.95)
    assert lo3 < lo10 < 2.5 and hi3 == pytest.approx(100 - lo3)
    with pytest.raises(NnobsError, match="at least 2 seeds"):
        expanded_percentiles(1, 0.95)
    rng = np.random.default_rng(0)
    base = rng.normal(0.3, 0.05, (5, len(STEPS), 2))  # seed effects shared across conditions
    seeded = base.copy()
    seeded[:, :, 1] += 0.05  # layer 1 only
    out = analyse({"seeded": seeded, "random": base}, STEPS, {"gap": ("seeded", "random")})
    layers = out["gap"]["layers"]
    assert [layer["verdict"] for layer in layers] == ["absent", "persists"]
    assert layers[0]["gap"] == pytest.approx([0.0] * len(STEPS))  # paired: offsets cancel
    assert early_window(STEPS).tolist() == [s in (8, 16, 32) for s in STEPS]
    with pytest.raises(NnobsError, match="not finite"):
        analyse_gap(np.full((5, len(STEPS)), np.nan), STEPS)
