from collections import Counter

import numpy as np
import pytest

from nnobs.core.errors import NnobsError
from nnobs.observe.collapse import detect_collapse, sd_from_interval

STEPS = [256, 1000, 2000, 4000, 8000, 16000, 24000, 32000]
FALLING_LOSS = [6.0, 4.5, 3.8, 3.4, 3.2, 3.1, 3.05, 3.0]
RISING_LATE = [6.0, 4.5, 3.8, 3.4, 3.5, 3.8, 4.1, 4.5]  # overfits after step 4000
SD = 0.02  # each checkpoint's value
NULL = (0.06, 0.02)  # the random-init model's value and its sd


def run(values, loss=FALLING_LOSS, sd=SD, null=NULL, **kw):
    """detect_collapse on one headline series (and optional extra layers in kw['layers'])."""
    layers = kw.pop("layers", {})
    series = {
        "h": (values, [sd] * len(values)),
        **{k: (v, [sd] * len(v)) for k, v in layers.items()},
    }
    return detect_collapse(STEPS, loss, series, {k: null for k in series}, "h", **kw)


def test_rise_then_fall_with_improving_loss_is_erased_at_the_right_steps():
    r = run([0.06, 0.12, 0.25, 0.31, 0.18, 0.05, 0.04, 0.05])
    assert r["verdict"] == "erased"
    # formed where z clears the Bonferroni quantile (0.12: z = 2.1 < 2.73; 0.25: z = 6.7)
    assert (r["headline"]["formed_step"], r["peak_step"], r["collapse_step"]) == (2000, 4000, 16000)
    assert (r["headline"]["loss_at_peak"], r["headline"]["loss_at_collapse"]) == (3.4, 3.1)
    assert "fell to the null's level" in r["reason"]


def test_rise_and_stay_is_retained_and_a_fallen_layer_is_listed():
    r = run(
        [0.06, 0.10, 0.22, 0.30, 0.31, 0.29, 0.30, 0.30],
        layers={2: [0.06, 0.15, 0.25, 0.20, 0.05, 0.04, 0.03, 0.02]},
    )
    assert r["verdict"] == "retained" and r["collapse_step"] is None
    assert r["erased_layers"] == [2] and r["layers"][0]["collapse_step"] == 8000


def test_never_above_the_null():
    r = run([0.05, 0.07, 0.09, 0.10, 0.08, 0.07, 0.06, 0.08])
    assert r["verdict"] == "never_formed" and "never above the null" in r["reason"]


def test_fall_while_loss_rises_is_not_collapse():
    r = run([0.06, 0.12, 0.25, 0.31, 0.18, 0.05, 0.04, 0.05], loss=RISING_LATE)
    assert r["verdict"] == "fell_with_loss" and "not a collapse" in r["reason"]
    bumpy = [6.0, 4.5, 3.8, 3.4, 3.3, 3.41, 3.2, 3.1]  # a bump within the tolerance is forgiven
    values = [0.06, 0.12, 0.25, 0.31, 0.18, 0.05, 0.04, 0.05]
    assert run(values, loss=bumpy)["verdict"] == "fell_with_loss"
    assert run(values, loss=bumpy, loss_tolerance=0.02)["verdict"] == "erased"


def test_a_fall_within_the_noise_is_inconclusive_not_erased():
    # formed (0.20 vs null 0.06) but with wide intervals the end is neither above the null
    # nor shown to be below the peak
    r = run([0.06, 0.10, 0.20, 0.18, 0.16, 0.14, 0.13, 0.12], sd=0.035)
    assert r["verdict"] == "inconclusive" and "within the noise" in r["reason"]


def test_the_random_init_step_is_judged_by_the_same_null():
    # step 0 is the null model itself: it sits at the null and cannot form
    r = run([0.06, 0.06, 0.07, 0.06, 0.05, 0.06, 0.07, 0.06])
    assert r["verdict"] == "never_formed" and abs(r["headline"]["final_z"]) < 1


def test_calibration_on_simulated_trajectories():
    """With the measured noise (a checkpoint's sd 0.03; the null's 0.02), a flat trajectory is
    called erased at most 5% of the time and a real rise-and-fall is found."""
    rng = np.random.default_rng(0)

    def verdicts(curve, n=400):
        out = Counter()
        for _ in range(n):
            values = np.asarray(curve) + rng.normal(0, 0.03, len(curve))
            null = (0.07 + rng.normal(0, 0.02), 0.02)
            out[run(values, sd=0.03, null=null)["verdict"]] += 1
        return out

    for level in (0.07, 0.12, 0.25):  # at the null, just above it, well above it
        assert verdicts([level] * 8)["erased"] <= 0.05 * 400
    found = verdicts([0.07, 0.20, 0.25, 0.22, 0.15, 0.08, 0.07, 0.06])
    assert found["erased"] >= 0.9 * 400


def test_sd_from_interval():
    assert sd_from_interval(-1.959964, 1.959964) == pytest.approx(1.0, rel=1e-5)


def test_bad_inputs():
    null = {"h": (0.0, 0.01)}
    with pytest.raises(NnobsError, match="increasing"):
        detect_collapse([0, 2, 1], [1, 1, 1], {"h": ([0, 0, 0], [0, 0, 0])}, null, "h")
    with pytest.raises(NnobsError, match="rows"):
        detect_collapse([0, 1, 2], [1, 1, 1], {"h": ([0, 0], [0, 0])}, null, "h")
    with pytest.raises(NnobsError, match="NaN"):
        detect_collapse([0, 1, 2], [1, np.nan, 1], {"h": ([0, 0, 0], [0, 0, 0])}, null, "h")
    with pytest.raises(NnobsError, match="one \\(value, sd\\) per series"):
        detect_collapse([0, 1], [1, 1], {"h": ([0, 0], [0, 0])}, {"x": (0, 0)}, "h")
    with pytest.raises(NnobsError, match="headline series"):
        detect_collapse([0, 1], [1, 1], {"h": ([0, 0], [0, 0])}, null, "other")
    with pytest.raises(NnobsError, match="negative"):
        detect_collapse([0, 1], [1, 1], {"h": ([0, 0], [0.1, -0.1])}, null, "h")
    with pytest.raises(NnobsError, match="at least 2"):
        detect_collapse([0], [1], {"h": ([0], [0])}, null, "h")
