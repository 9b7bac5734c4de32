"""The verdict's test against a null of a few random-init models, on simulated values where
the truth is known."""

import numpy as np
import pytest

from nnobs.core.errors import NnobsError
from nnobs.measure.nulltest import compare_to_null, replicate_sd


def simulate(rng, shift, k=3, sampling=0.02, between=0.01, n=2000):
    """Share of ``n`` simulated experiments called significant: each has an observed value
    and ``k`` null models, every model with its own offset (between-model spread) and its
    measured value drawn with the sampling noise it reports."""
    hits = 0
    for _ in range(n):
        observed = 0.07 + shift + rng.normal(0, between) + rng.normal(0, sampling)
        nulls = 0.07 + rng.normal(0, between, k) + rng.normal(0, sampling, k)
        hits += compare_to_null(observed, sampling, nulls, [sampling] * k)["significant"]
    return hits / n


@pytest.mark.parametrize("k, between", [(3, 0.0), (3, 0.02), (3, 0.04), (5, 0.02)])
def test_the_null_comes_out_null_at_the_nominal_rate(k, between):
    rate = simulate(np.random.default_rng(k), shift=0.0, k=k, between=between)
    assert rate <= 0.07  # nominal 5%; 2000 draws put the rate within ±1% of the truth


def test_a_planted_effect_is_found():
    assert simulate(np.random.default_rng(1), shift=0.15, n=500) > 0.95


def test_the_record_reads_as_a_test():
    test = compare_to_null(0.25, 0.02, [0.06, 0.07, 0.08], [0.02, 0.02, 0.02])
    assert test["n_null"] == 3 and test["null_mean"] == pytest.approx(0.07)
    # between-model variance: sample variance 1e-4 minus the sampling part 4e-4 -> 0
    assert test["between_model_sd"] == 0.0
    expected_sd = np.sqrt(0.02**2 + 0.02**2 / 3)
    assert test["predictive_sd"] == pytest.approx(expected_sd)
    assert test["floor"] == pytest.approx(0.07 + 1.644854 * expected_sd, rel=1e-6)
    assert test["significant"] and test["p_value"] < 1e-6
    assert not compare_to_null(0.08, 0.02, [0.06, 0.07, 0.08], [0.02] * 3)["significant"]


def test_bad_inputs():
    with pytest.raises(NnobsError, match="level"):
        compare_to_null(0.1, 0.01, [0.0], [0.01], level=0.7)
    with pytest.raises(NnobsError, match="rows"):
        compare_to_null(0.1, 0.01, [0.0, 0.1], [0.01])
    with pytest.raises(NnobsError, match="no spread"):
        compare_to_null(0.1, 0.0, [0.0], [0.0])
    with pytest.raises(NnobsError, match="at least 2 defined"):
        replicate_sd(np.array([np.nan, 0.1]))
