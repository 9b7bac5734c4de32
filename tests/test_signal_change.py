"""The paired before-vs-after comparison of the decision-quality signal, on simulated models
whose truth is known."""

import numpy as np
import pytest

from nnobs.core.errors import NnobsError
from nnobs.features.signal_change import HeadlineInputs, change_verdict, paired_change
from nnobs.measure import stats

N_DOCS, PER_DOC, WIDTH, SEEDS = 30, 30, 6, 5


def _study(rng: np.random.Generator, slopes: tuple[float, float]) -> list[HeadlineInputs]:
    """Two models on the same test tokens. Each token has a latent quality ``q`` (partly its
    document's); a model's loss rises with its slope × q beyond what its controls say, and its
    activations carry q. Each model's probe misses the true direction by a training error, and
    each seed's probe (a resample of the training documents) misses that probe by as much
    again: the structure the observe protocol's seeds sample."""
    documents = np.repeat(np.arange(N_DOCS), PER_DOC)
    n = len(documents)
    q = 0.7 * rng.normal(size=N_DOCS)[documents] + rng.normal(size=n)
    controls = rng.normal(size=(n, 2))
    shared_noise = 0.7 * rng.normal(size=n) + 0.5 * rng.normal(size=N_DOCS)[documents]
    base_acts = rng.normal(size=(n, WIDTH))
    base_acts[:, 0] += q + 0.5 * controls[:, 0]
    truth = np.eye(WIDTH)[0]
    out = []
    for slope in slopes:
        loss = controls[:, 0] + slope * q + shared_noise + 0.7 * rng.normal(size=n)
        acts = base_acts + 0.3 * rng.normal(size=(n, WIDTH))
        probe = truth + 0.15 * rng.normal(size=WIDTH)
        weights = probe[:, None] + 0.15 * rng.normal(size=(WIDTH, SEEDS))
        scores = acts @ weights
        per_seed = stats.PartialSpearman(loss, controls)(scores)
        ensemble = ((scores - scores.mean(0)) / scores.std(0)).mean(1)
        out.append(HeadlineInputs(ensemble, loss, controls, documents, list(per_seed)))
    return out


def test_no_change_is_called_changed_at_most_at_the_nominal_rate():
    rng = np.random.default_rng(0)
    results = [paired_change(*_study(rng, (0.4, 0.4)), n_boot=200, seed=i) for i in range(200)]
    changed = np.mean([r["changed"] for r in results])
    # 5% nominal; 200 studies put the binomial's 99.9% bound near 11%
    assert changed <= 0.10
    assert changed >= 0.005  # not so conservative that it never fires
    covered = np.mean([r["interval"][0] <= 0 <= r["interval"][1] for r in results])
    assert covered >= 0.9
    assert {r["verdict"] for r in results} <= {"kept", "unclear", "fell", "rose"}


def test_a_planted_drop_is_found_and_called_fell():
    rng = np.random.default_rng(1)
    results = [paired_change(*_study(rng, (0.4, 0.15)), n_boot=200, seed=i) for i in range(50)]
    verdicts = [r["verdict"] for r in results]
    assert verdicts.count("fell") >= 45
    assert all(r["difference"] < 0 for r in results)
    assert "rose" not in verdicts


def test_pairing_narrows_the_interval_when_the_models_share_their_documents():
    before, after = _study(np.random.default_rng(2), (0.4, 0.4))
    paired = np.nanstd(after.replicates(400, 0) - before.replicates(400, 0))
    unpaired = np.nanstd(after.replicates(400, 0) - before.replicates(400, 1))
    assert paired < 0.7 * unpaired


def test_the_verdict_words():
    assert change_verdict(True, -0.1, [-0.15, -0.05], 0.05) == "fell"
    assert change_verdict(True, 0.1, [0.05, 0.15], 0.05) == "rose"
    assert change_verdict(False, 0.01, [-0.03, 0.04], 0.05) == "kept"
    assert change_verdict(False, 0.01, [-0.03, 0.08], 0.05) == "unclear"


def test_unpaired_inputs_are_refused():
    before, after = _study(np.random.default_rng(3), (0.4, 0.4))
    shifted = HeadlineInputs(after.score, after.loss, after.covariates, after.documents + 1,
                           after.per_seed)  # fmt: skip
    with pytest.raises(NnobsError, match="same tokens"):
        paired_change(before, shifted)
    with pytest.raises(NnobsError, match="same seeds"):
        paired_change(before, HeadlineInputs(after.score, after.loss, after.covariates,
                                           after.documents, after.per_seed[:3]))  # fmt: skip
