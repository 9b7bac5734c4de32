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


def test_the_labels_positive_rates_by_confidence_show_what_each_label_learns():
    # Loss is convex in confidence: the reference label's OLS line sits below the loss of
    # near-certain tokens, so it calls most of them "worse than predicted"; the rank label
    # (the residual pcorr correlates) stays near one half there.
    from nnobs.observe.signal import label_diagnostic

    train = synthetic_split("train", 6000, 1, 0.3, plant=False)
    rates = label_diagnostic(train, SITE)
    assert len(rates["max_softmax_edges"]) == 11 and len(rates["rank"]) == 10
    assert rates["reference"][-1] > 0.65 and abs(rates["rank"][-1] - 0.5) < 0.15
    # each label is positive for about half the tokens overall
    from nnobs.observe.signal import residual_labels

    for label in ("rank", "reference"):
        assert 0.35 < residual_labels(train, SITE, label).mean() < 0.65


def test_headline_replicates_add_the_probe_training_spread_to_the_test_documents():
    from nnobs.observe.signal import headline_replicates

    test = synthetic_split("test", 4000, 2, 0.3)
    score = test.acts(SITE)[:, 0].astype(np.float64) + test.cap.loss
    docs_only = stats.partial_spearman_replicates(
        score, test.cap.loss, test.covariates(SITE), n_boot=2000, groups=test.cap.doc_ids
    )
    seeds = [0.20, 0.30, 0.25, 0.15, 0.35]  # a probe-training spread larger than the documents'
    both = headline_replicates(score, seeds, test, SITE, n_boot=2000)
    seed_var = np.var(seeds, ddof=1)  # the sqrt(S/(S-1)) scaling makes this the added variance
    assert np.var(both) == pytest.approx(np.var(docs_only) + seed_var, rel=0.15)
    # centred where the documents-only replicates are: seed deviations add spread, not bias
    assert np.mean(both) == pytest.approx(np.mean(docs_only), abs=0.01)
