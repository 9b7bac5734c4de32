import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from nnobs.core.errors import NnobsError
from nnobs.measure import arrays, probes
from nnobs.measure.predictors import LossMLP, NonlinearControl
from nnobs.measure.probes import (
    LinearProbe,
    RandomHead,
    fit_resampled,
    linear_scores,
    random_head_scores,
)
from nnobs.measure.stats import seed_agreement

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference_probe import ReferenceAdamProbe  # noqa: E402


def planted(n: int, d: int, seed: int = 0, strength: float = 2.0):
    """Anisotropic activations with an offset mean, and a label driven by one direction."""
    rng = np.random.default_rng(seed)
    scales = np.linspace(3.0, 0.3, d)
    X = rng.standard_normal((n, d)) * scales + rng.normal(0, 2, d)
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    proj = (X - X.mean(0)) @ u
    y = rng.random(n) < 1 / (1 + np.exp(-strength * proj / proj.std()))
    return X.astype(np.float32), y.astype(np.float32), u


@pytest.fixture(scope="module")
def data():
    X, y, u = planted(8000, 32)
    return X[:4000], y[:4000], X[4000:], y[4000:], u


def test_planted_direction_is_found(data):
    Xtr, ytr, Xte, yte, u = data
    probe = LinearProbe(resample=False).fit(Xtr, ytr)
    assert probe.converged_ and probe.n_iter_ < 50
    assert probe.score(Xte, yte) > 0.8
    assert probe.score(Xte, yte) == pytest.approx(roc_auc_score(yte, probe.decision_function(Xte)))
    assert float(probe.direction @ u) > 0.9
    assert np.linalg.norm(probe.direction) == pytest.approx(1.0)
    np.testing.assert_allclose(
        probe.decision_function(Xte),
        Xte.astype(np.float64) @ probe.coef_ + probe.intercept_,
        rtol=1e-4,
        atol=1e-4,
    )


def test_null_labels_give_chance_auc(data):
    Xtr, _, Xte, _, _ = data
    rng = np.random.default_rng(1)
    probe = LinearProbe(resample=False).fit(Xtr, rng.random(4000) < 0.5)
    assert abs(probe.score(Xte, rng.random(4000) < 0.5) - 0.5) < 0.05


def test_objective_at_least_as_good_as_reference(data):
    Xtr, ytr, _, _, _ = data
    ours = LinearProbe(resample=False).fit(Xtr, ytr)
    ref = ReferenceAdamProbe(seed=0).fit(Xtr, ytr)
    assert ours.objective(Xtr, ytr) <= ref.objective(Xtr, ytr)
    # ... and it is the optimum: the objective's gradient vanishes there.
    Xd = np.column_stack([Xtr.astype(np.float64), np.ones(len(Xtr))])
    theta = np.append(ours.coef_, ours.intercept_)
    p = 1 / (1 + np.exp(-Xd @ theta))
    grad = Xd.T @ (p - ytr) / len(ytr) + ours.l2 * theta
    assert np.abs(grad).max() < 1e-4


def test_reference_probe_is_seeded(data):
    Xtr, ytr, Xte, _, _ = data
    a = ReferenceAdamProbe(seed=3, epochs=2).fit(Xtr, ytr).decision_function(Xte)
    b = ReferenceAdamProbe(seed=3, epochs=2).fit(Xtr, ytr).decision_function(Xte)
    c = ReferenceAdamProbe(seed=4, epochs=2).fit(Xtr, ytr).decision_function(Xte)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_seeds_resample_rows(data):
    Xtr, ytr, Xte, _, _ = data
    scores = [LinearProbe(seed=s).fit(Xtr, ytr).decision_function(Xte) for s in (43, 44, 45)]
    assert not np.allclose(scores[0], scores[1])
    assert seed_agreement(scores) > 0.95
    plain = [LinearProbe(seed=s, resample=False).fit(Xtr, ytr).coef_ for s in (1, 2)]
    np.testing.assert_array_equal(plain[0], plain[1])


def test_seeds_fit_together_reach_each_seeds_own_optimum(data):
    Xtr, ytr, _, _, _ = data
    docs = np.arange(4000) // 100
    together = fit_resampled(Xtr.astype(np.float16), ytr, [43, 44, 45], groups=docs)
    for probe in together:
        alone = LinearProbe(seed=probe.seed).fit(Xtr.astype(np.float16), ytr, groups=docs)
        rows, weight = alone._resample(len(Xtr), docs)
        # the same resample, so the same strictly convex objective: equal optima
        X, y = Xtr.astype(np.float16)[rows].astype(np.float64), ytr[rows]
        z_alone, z_together = X @ alone.coef_ + alone.intercept_, X @ probe.coef_ + probe.intercept_
        objective = [weight @ (np.logaddexp(0, z) - y * z) for z in (z_alone, z_together)]
        assert objective[1] == pytest.approx(objective[0], abs=1e-7)
        cosine = (
            probe.coef_ @ alone.coef_ / np.linalg.norm(probe.coef_) / np.linalg.norm(alone.coef_)
        )
        assert cosine > 0.9999 and probe.converged_
    assert not np.allclose(together[0].coef_, together[1].coef_)  # seeds still differ


def test_small_searches_run_on_one_thread_and_give_the_threads_back(data, monkeypatch):
    Xtr, ytr, _, _, _ = data
    import torch

    before = torch.get_num_threads()
    seen = []
    search = probes._lbfgs
    monkeypatch.setattr(
        probes, "_lbfgs", lambda *a: seen.append(torch.get_num_threads()) or search(*a)
    )
    torch.set_num_threads(2)
    try:
        fit_resampled(Xtr, ytr, [43, 44])
        LinearProbe().fit(Xtr, ytr)
        assert seen == [1, 1, 1] and torch.get_num_threads() == 2
        monkeypatch.setattr(arrays, "CHUNK_ELEMENTS", Xtr.size // 2)  # now "large": all threads
        LinearProbe(resample=False).fit(Xtr, ytr)
        assert seen[-1] == 2
        monkeypatch.setattr(arrays, "CHUNK_ELEMENTS", 1 << 24)

        def fails(*_):
            raise RuntimeError("interrupted")

        monkeypatch.setattr(probes, "_lbfgs", fails)
        with pytest.raises(RuntimeError):
            LinearProbe().fit(Xtr, ytr)
        assert torch.get_num_threads() == 2  # restored when the search fails too
    finally:
        torch.set_num_threads(before)


def test_grouped_resample_differs_from_row_resample(data):
    Xtr, ytr, _, _, _ = data
    docs = np.arange(4000) // 100
    by_doc = LinearProbe(seed=7).fit(Xtr, ytr, groups=docs).coef_
    by_row = LinearProbe(seed=7).fit(Xtr, ytr).coef_
    assert not np.allclose(by_doc, by_row)
    assert float(by_doc @ by_row) / np.linalg.norm(by_doc) / np.linalg.norm(by_row) > 0.9


def test_memmap_and_float16_inputs(data, tmp_path):
    Xtr, ytr, Xte, _, _ = data
    probe = LinearProbe(resample=False).fit(Xtr, ytr)
    expected = probe.decision_function(Xte)
    mm = np.lib.format.open_memmap(
        tmp_path / "acts.npy", mode="w+", dtype=np.float16, shape=Xte.shape
    )
    mm[:] = Xte
    mm.flush()
    ro = np.load(tmp_path / "acts.npy", mmap_mode="r")
    half = probe.decision_function(ro)
    assert spearmanr(half, expected)[0] > 0.999
    np.testing.assert_allclose(probe.decision_function(Xte.astype(np.float16)), half)
    # fitting straight from a float16 memmap reaches the same probe
    mm_tr = np.lib.format.open_memmap(
        tmp_path / "tr.npy", mode="w+", dtype=np.float16, shape=Xtr.shape
    )
    mm_tr[:] = Xtr
    from_mm = LinearProbe(resample=False).fit(mm_tr, ytr)
    assert float(from_mm.direction @ probe.direction) > 0.999


def test_bad_input_errors(data):
    Xtr, ytr, _, _, _ = data
    with pytest.raises(NnobsError, match="both classes"):
        LinearProbe().fit(Xtr, np.ones(len(Xtr)))
    bad = Xtr.copy()
    bad[10, 3] = np.nan
    with pytest.raises(NnobsError, match="1 NaN values"):
        LinearProbe().fit(bad, ytr)
    with pytest.raises(NnobsError, match="binary"):
        LinearProbe().fit(Xtr, ytr * 2)
    with pytest.raises(NnobsError, match="one value per activation row"):
        LinearProbe().fit(Xtr, ytr[:-1])
    with pytest.raises(NnobsError, match="not fitted"):
        LinearProbe().decision_function(Xtr)
    probe = LinearProbe(resample=False).fit(Xtr, ytr)
    with pytest.raises(NnobsError, match="31 features but the probe was fit on 32"):
        probe.decision_function(Xtr[:, :31])


def test_random_head_is_a_seeded_unit_direction(data):
    Xtr, ytr, _, _, _ = data
    h = RandomHead(seed=5).fit(Xtr)
    s = h.decision_function(Xtr)
    assert np.linalg.norm(h.coef_) == pytest.approx(1.0)
    np.testing.assert_allclose(s, Xtr.astype(np.float64) @ h.coef_, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(RandomHead(seed=5).fit(Xtr).decision_function(Xtr), s)
    assert not np.allclose(RandomHead(seed=6).fit(Xtr).decision_function(Xtr), s)


def test_many_scorers_in_one_product_equal_each_alone(data, monkeypatch):
    Xtr, ytr, Xte, _, _ = data
    monkeypatch.setattr(arrays, "CHUNK_ELEMENTS", 32 * 100)  # several row blocks of 100
    fitted = [LinearProbe(seed=s).fit(Xtr, ytr) for s in (43, 44)]
    scorers = [*fitted, RandomHead(seed=3).fit(Xte)]
    half = Xte.astype(np.float16)
    exact = half.astype(np.float64) @ np.column_stack([s.coef_ for s in scorers])
    exact += [s.intercept_ for s in scorers]
    np.testing.assert_allclose(linear_scores(scorers, half), exact, rtol=1e-5, atol=1e-5)
    heads = random_head_scores(half, 4)
    assert heads.shape == (len(Xte), 4)
    np.testing.assert_allclose(heads[:, 3], exact[:, 2], rtol=1e-5, atol=1e-5)
    bad = half.copy()
    bad[250, 0] = np.inf  # in the third block
    with pytest.raises(NnobsError, match=r"rows 200\.\.299\) contains 1 infinite"):
        linear_scores(scorers, bad)
    with pytest.raises(NnobsError, match="exceed the float32 range"):
        linear_scores(scorers, Xte.astype(np.float64) * 1e300)


def test_loss_mlp_learns_a_nonlinear_target():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3000, 8)).astype(np.float32) * 5 + 10
    z = (X[:, 0] - 10) / 5
    loss = 2.0 + np.abs(z) + 0.1 * rng.standard_normal(3000)
    mlp = LossMLP(epochs=30, seed=0, patience=5, batch_size=64).fit(X[:2000], loss[:2000])
    pred = mlp.predict(X[2000:])
    resid = loss[2000:] - pred
    assert resid.var() < 0.25 * loss[2000:].var()
    assert 1 <= mlp.n_epochs_ <= 30
    again = (
        LossMLP(epochs=30, seed=0, patience=5, batch_size=64)
        .fit(X[:2000], loss[:2000])
        .predict(X[2000:])
    )
    np.testing.assert_array_equal(pred, again)


def test_nonlinear_control_fits_non_monotone_relation():
    rng = np.random.default_rng(0)
    c = np.column_stack([rng.random(4000), rng.random(4000) * 50])
    loss = (c[:, 0] - 0.5) ** 2 * 8 + 0.02 * c[:, 1] + 0.05 * rng.standard_normal(4000)
    ctrl = NonlinearControl(seed=0).fit(c[:3000], loss[:3000])
    resid = loss[3000:] - ctrl.predict(c[3000:])
    assert resid.std() < 0.1
    with pytest.raises(NnobsError, match="2 columns"):
        ctrl.predict(c[:, :1])
