import numpy as np
import pytest

from nnobs.core.errors import NnobsError
from nnobs.observe.collapse import detect_collapse

STEPS = [256, 1000, 2000, 4000, 8000, 16000, 24000, 32000]
FALLING_LOSS = [6.0, 4.5, 3.8, 3.4, 3.2, 3.1, 3.05, 3.0]
RISING_LATE = [6.0, 4.5, 3.8, 3.4, 3.5, 3.8, 4.1, 4.5]  # overfits after step 4000
FLOOR = 0.06


def _layer(result, layer):
    return next(r for r in result["layers"] if r["layer"] == layer)


def test_rise_then_fall_with_improving_loss_is_erased_at_the_right_step_and_layer():
    pcorr = {
        0: [0.02, 0.03, 0.04, 0.03, 0.04, 0.03, 0.04, 0.03],  # never formed
        3: [0.03, 0.12, 0.25, 0.31, 0.18, 0.05, 0.04, 0.05],  # erased from step 16000
        5: [0.02, 0.08, 0.15, 0.20, 0.20, 0.12, 0.05, 0.04],  # erased from step 24000
    }
    r = detect_collapse(STEPS, FALLING_LOSS, pcorr, FLOOR)
    assert r["verdict"] == "erased"
    # the headline is the layer with the strongest signal before it vanished
    assert (r["layer"], r["collapse_step"], r["peak_step"]) == (3, 16000, 4000)
    assert r["erased_layers"] == [3, 5]
    l3, l5, l0 = _layer(r, 3), _layer(r, 5), _layer(r, 0)
    assert (l3["verdict"], l3["formed_step"], l3["peak_pcorr"]) == ("erased", 1000, 0.31)
    assert (l3["loss_at_peak"], l3["loss_at_collapse"]) == (3.4, 3.1)
    assert (l5["verdict"], l5["formed_step"], l5["collapse_step"]) == ("erased", 2000, 24000)
    assert l0["verdict"] == "never_formed" and l0["formed_step"] is None


def test_rise_and_stay_is_retained():
    pcorr = {0: [0.03, 0.10, 0.22, 0.30, 0.31, 0.29, 0.30, 0.30]}
    r = detect_collapse(STEPS, FALLING_LOSS, pcorr, FLOOR)
    assert r["verdict"] == "retained"
    assert r["layer"] is None and r["collapse_step"] is None and r["erased_layers"] == []
    assert _layer(r, 0)["peak_step"] == 8000


def test_one_layer_erased_another_retained_keeps_the_run_but_lists_the_layer():
    pcorr = {
        "blocks.2.resid_post": [0.03, 0.15, 0.25, 0.20, 0.05, 0.04, 0.03, 0.02],
        "blocks.4.resid_post": [0.03, 0.10, 0.15, 0.20, 0.22, 0.22, 0.21, 0.20],
    }
    r = detect_collapse(STEPS, FALLING_LOSS, pcorr, FLOOR)
    assert r["verdict"] == "retained"
    assert r["erased_layers"] == ["blocks.2.resid_post"]
    assert _layer(r, "blocks.2.resid_post")["collapse_step"] == 8000


def test_never_above_floor():
    pcorr = {0: [0.01, 0.02, 0.05, 0.06, 0.04, 0.03, 0.02, 0.05]}
    r = detect_collapse(STEPS, FALLING_LOSS, pcorr, FLOOR)
    assert r["verdict"] == "never_formed"
    assert "never above" in _layer(r, 0)["reason"]


def test_fall_while_loss_rises_is_not_collapse():
    pcorr = {1: [0.03, 0.12, 0.25, 0.31, 0.18, 0.05, 0.04, 0.05]}
    r = detect_collapse(STEPS, RISING_LATE, pcorr, FLOOR)
    assert r["verdict"] == "fell_with_loss"
    layer = _layer(r, 1)
    assert layer["verdict"] == "fell_with_loss" and layer["collapse_step"] == 16000
    assert "loss rose" in layer["reason"] and "not a collapse" in layer["reason"]
    assert r["erased_layers"] == [] and r["layer"] is None
    # a loss bump within the tolerance still counts as "kept improving"
    bumpy = [6.0, 4.5, 3.8, 3.4, 3.3, 3.41, 3.2, 3.1]
    assert detect_collapse(STEPS, bumpy, pcorr, FLOOR)["verdict"] == "fell_with_loss"
    assert detect_collapse(STEPS, bumpy, pcorr, FLOOR, loss_tolerance=0.02)["verdict"] == "erased"


def test_noise_around_the_floor_does_not_form():
    rng = np.random.default_rng(0)
    for _ in range(20):
        noisy = FLOOR + rng.uniform(-0.015, 0.015, len(STEPS))
        r = detect_collapse(STEPS, FALLING_LOSS, {0: noisy}, FLOOR)
        assert r["verdict"] == "never_formed"
    # without the margin, the same noise "forms" and then "collapses": the margin matters
    noisy = [0.05, 0.07, 0.05, 0.055, 0.05, 0.05, 0.05, 0.05]
    assert detect_collapse(STEPS, FALLING_LOSS, {0: noisy}, FLOOR)["verdict"] == "never_formed"
    zero = detect_collapse(STEPS, FALLING_LOSS, {0: noisy}, FLOOR, formed_margin=0.0)
    assert zero["verdict"] == "erased"


def test_formation_uses_the_ci_lower_bound_when_given():
    pcorr = {0: [0.03, 0.075, 0.10, 0.09, 0.05, 0.04, 0.04, 0.03]}
    wide = {0: [-0.02, 0.02, 0.04, 0.03, 0.0, -0.01, -0.01, -0.02]}  # never clears the floor
    tight = {0: [0.01, 0.07, 0.08, 0.07, 0.03, 0.02, 0.02, 0.01]}  # clears it at step 1000
    # point estimates clear floor + 0.02 at step 2000 only
    assert _layer(detect_collapse(STEPS, FALLING_LOSS, pcorr, FLOOR), 0)["formed_step"] == 2000
    r_wide = detect_collapse(STEPS, FALLING_LOSS, pcorr, FLOOR, ci_low=wide)
    assert r_wide["verdict"] == "never_formed"
    r_tight = detect_collapse(STEPS, FALLING_LOSS, pcorr, FLOOR, ci_low=tight)
    assert r_tight["verdict"] == "erased" and r_tight["settings"]["evidence"] == "ci_low"
    assert _layer(r_tight, 0)["formed_step"] == 1000
    assert (r_tight["collapse_step"], r_tight["peak_step"]) == (8000, 2000)


def test_dip_that_recovers_is_not_collapse_and_last_run_counts():
    pcorr = {0: [0.03, 0.20, 0.05, 0.04, 0.20, 0.25, 0.05, 0.04]}
    r = detect_collapse(STEPS, FALLING_LOSS, pcorr, FLOOR)
    assert r["verdict"] == "erased"
    assert (r["peak_step"], r["collapse_step"]) == (16000, 24000)
    recovered = {0: [0.03, 0.20, 0.05, 0.04, 0.20, 0.25, 0.05, 0.15]}
    assert detect_collapse(STEPS, FALLING_LOSS, recovered, FLOOR)["verdict"] == "retained"


def test_per_checkpoint_floor():
    pcorr = {0: [0.03, 0.15, 0.20, 0.20, 0.15, 0.12, 0.11, 0.11]}
    # the floor was re-measured along the run and rose (e.g. larger random-init null)
    floors = [0.05, 0.05, 0.06, 0.07, 0.09, 0.10, 0.12, 0.12]
    r = detect_collapse(STEPS, FALLING_LOSS, pcorr, floors)
    assert r["verdict"] == "erased" and r["collapse_step"] == 24000
    assert detect_collapse(STEPS, FALLING_LOSS, pcorr, 0.06)["verdict"] == "retained"


def test_bad_inputs():
    with pytest.raises(NnobsError, match="increasing"):
        detect_collapse([0, 2, 1], [1, 1, 1], {0: [0, 0, 0]}, 0.1)
    with pytest.raises(NnobsError, match="rows"):
        detect_collapse([0, 1, 2], [1, 1, 1], {0: [0, 0]}, 0.1)
    with pytest.raises(NnobsError, match="NaN"):
        detect_collapse([0, 1, 2], [1, np.nan, 1], {0: [0, 0, 0]}, 0.1)
    with pytest.raises(NnobsError, match="same layers"):
        detect_collapse([0, 1], [1, 1], {0: [0, 0]}, 0.1, ci_low={1: [0, 0]})
    with pytest.raises(NnobsError, match="swapped"):
        detect_collapse([0, 1], [1, 1], {0: [0.1, 0.1]}, 0.05, ci_low={0: [0.2, 0.0]})
    with pytest.raises(NnobsError, match="at least 2"):
        detect_collapse([0], [1], {0: [0]}, 0.1)
