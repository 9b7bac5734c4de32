"""The protocol's statistics on synthetic activations with a known answer.

A planted direction that predicts loss beyond confidence must be found; removing it must
bring pcorr inside the detection floor; a probe that only reads confidence must look strong
uncontrolled and come out ~0 controlled.
"""

import numpy as np
import pytest

from nnobs.measure import stats
from nnobs.measure.probes import LinearProbe, RandomHead
from nnobs.observe.capture import Capture
from nnobs.observe.signal import fit_probe, pcorr
from nnobs.observe.splits import SplitData

D = 32
SITE = "blocks.0.resid_post"


def synthetic_split(
    name: str, n: int, seed: int, hidden_weight: float, plant: bool = True
) -> SplitData:
    """Tokens whose loss = confidence part + hidden difficulty ``s`` + noise.

    Activations carry confidence along ``v`` and (if ``plant``) the hidden difficulty along
    ``u``; the norm is kept constant-ish so it explains nothing by construction.
    """
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(np.random.default_rng(0).standard_normal((D, D)))[0]
    u, v = directions[:, 0], directions[:, 1]
    confidence_logit = rng.standard_normal(n)
    hidden = rng.standard_normal(n)
    max_softmax = 1 / (1 + np.exp(-confidence_logit))
    loss = np.exp(-confidence_logit) * 0.5 + hidden_weight * hidden + 0.3 * rng.standard_normal(n)
    loss = loss - loss.min() + 0.01
    X = rng.standard_normal((n, D)) * 0.5 + np.outer(confidence_logit, v)
    if plant:
        X += np.outer(hidden, u)
    docs = np.arange(n) // 50
    cap = Capture(
        loss=loss.astype(np.float32),
        max_softmax=max_softmax.astype(np.float32),
        entropy=(1 - max_softmax).astype(np.float32),
        doc_ids=docs,
        acts={SITE: X.astype(np.float16)},
        norms={SITE: np.linalg.norm(X, axis=1).astype(np.float32)},
        stats={},
    )
    return SplitData(name, cap)


def floor_of(split: SplitData, n_heads: int = 50) -> float:
    X = split.acts(SITE)
    heads = np.column_stack(
        [RandomHead(seed=s).fit(X).decision_function(X) for s in range(n_heads)]
    )
    null = stats.partial_spearman_many(heads, split.cap.loss, split.covariates(SITE))
    return stats.detection_floor(np.abs(null))["floor"]


def test_a_planted_direction_is_found_and_its_removal_falls_inside_the_floor():
    train = synthetic_split("train", 6000, 1, hidden_weight=0.6)
    test = synthetic_split("test", 4000, 2, hidden_weight=0.6)
    probe = fit_probe(train, SITE, seed=42, resample=False, device="cpu")
    planted = pcorr(probe.decision_function(test.acts(SITE)), test, SITE)
    assert planted > 0.3

    # The probe's direction is the planted one, not the confidence direction.
    u = np.linalg.qr(np.random.default_rng(0).standard_normal((D, D)))[0][:, 0]
    assert abs(probe.direction @ u) > 0.9

    # Project the planted direction out of every activation: the signal is gone.
    def without_u(split: SplitData) -> SplitData:
        X = split.acts(SITE).astype(np.float64)
        X = X - np.outer(X @ u, u)
        cap = split.cap
        acts = {SITE: X.astype(np.float16)}
        return SplitData(split.name, Capture(**{**cap.__dict__, "acts": acts}))

    train0, test0 = without_u(train), without_u(test)
    probe0 = fit_probe(train0, SITE, seed=42, resample=False, device="cpu")
    removed = pcorr(probe0.decision_function(test0.acts(SITE)), test0, SITE)
    assert abs(removed) < max(floor_of(test0), 0.05)


def test_a_null_model_comes_out_null():
    train = synthetic_split("train", 6000, 3, hidden_weight=0.6, plant=False)
    test = synthetic_split("test", 4000, 4, hidden_weight=0.6, plant=False)
    probe = fit_probe(train, SITE, seed=42, resample=False, device="cpu")
    value = pcorr(probe.decision_function(test.acts(SITE)), test, SITE)
    assert abs(value) < max(floor_of(test), 0.05)


def test_a_naive_probe_that_reads_confidence_is_strong_uncontrolled_and_null_controlled():
    # Loss depends on confidence alone; activations encode confidence.
    train = synthetic_split("train", 6000, 5, hidden_weight=0.0, plant=False)
    test = synthetic_split("test", 4000, 6, hidden_weight=0.0, plant=False)
    naive = LinearProbe(resample=False).fit(
        train.acts(SITE), train.cap.loss > np.median(train.cap.loss)
    )
    score = naive.decision_function(test.acts(SITE))
    uncontrolled = stats.partial_spearman(score, test.cap.loss)
    controlled = pcorr(score, test, SITE)
    assert uncontrolled > 0.5
    assert abs(controlled) < 0.05


@pytest.mark.parametrize("seed", [43, 44])
def test_seeds_resample_documents_and_still_agree_on_a_real_signal(seed):
    train = synthetic_split("train", 6000, 7, hidden_weight=0.6)
    test = synthetic_split("test", 3000, 8, hidden_weight=0.6)
    a = fit_probe(train, SITE, seed=seed, resample=True, device="cpu")
    b = fit_probe(train, SITE, seed=seed + 10, resample=True, device="cpu")
    assert not np.allclose(a.coef_, b.coef_)
    agreement = stats.seed_agreement(
        [a.decision_function(test.acts(SITE)), b.decision_function(test.acts(SITE))]
    )
    assert agreement > 0.9
