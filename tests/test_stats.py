import numpy as np
import pytest
from scipy.stats import rankdata, spearmanr

from nnobs.core.errors import NnobsError
from nnobs.measure import stats
from nnobs.measure.stats import (
    LossResidualizer,
    PartialSpearman,
    bootstrap_ci,
    bootstrap_sampler,
    detection_floor,
    flag_catches,
    partial_spearman,
    partial_spearman_many,
    rank,
    seed_agreement,
)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_rank_averages_ties():
    np.testing.assert_array_equal(rank(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1.0, 3.5, 2.0])
    assert rank(np.array([1, 2])).dtype == np.float64


def test_rank_equals_scipy_with_and_without_ties(rng):
    continuous = rng.standard_normal((1000, 3))
    tied = rng.integers(0, 7, size=(1000, 3)).astype(np.float32)  # heavy ties, float32
    for x in (continuous, tied, tied[:, 0], np.zeros(5), np.array([-0.0, 0.0, 1.0])):
        np.testing.assert_array_equal(rank(x), rankdata(x, axis=0))


def test_no_covariates_is_spearman(rng):
    x = rng.standard_normal(300)
    y = x + rng.standard_normal(300)
    assert partial_spearman(x, y) == pytest.approx(spearmanr(x, y)[0], abs=1e-12)


def test_one_covariate_matches_textbook_formula(rng):
    z = rng.standard_normal(500)
    x = z + rng.standard_normal(500)
    y = np.exp(z) + 0.5 * x + rng.standard_normal(500)
    r = np.corrcoef(np.vstack([rank(x), rank(y), rank(z)]))
    rxy, rxz, ryz = r[0, 1], r[0, 2], r[1, 2]
    expected = (rxy - rxz * ryz) / np.sqrt((1 - rxz**2) * (1 - ryz**2))
    assert partial_spearman(x, y, z) == pytest.approx(expected, abs=1e-12)
    assert partial_spearman(x, y, z[:, None]) == pytest.approx(expected, abs=1e-12)


def test_common_cause_is_removed(rng):
    z = rng.standard_normal(4000)
    x = z + 0.3 * rng.standard_normal(4000)
    y = z + 0.3 * rng.standard_normal(4000)
    assert spearmanr(x, y)[0] > 0.8
    assert abs(partial_spearman(x, y, z)) < 0.05


def test_many_equals_loop(rng):
    n = 200
    cov = rng.standard_normal((n, 2))
    y = cov.sum(1) + rng.standard_normal(n)
    X = rng.standard_normal((n, 5)) + y[:, None] * np.arange(5)
    many = partial_spearman_many(X, y, cov)
    loop = [partial_spearman(X[:, j], y, cov) for j in range(5)]
    np.testing.assert_allclose(many, loop, atol=1e-12)
    assert many[0] == pytest.approx(partial_spearman(X[:, 0], y, cov))
    assert abs(many[0]) < 0.2 < many[4]
    reused = PartialSpearman(y, cov)  # y and covariates prepared once, scores one by one
    np.testing.assert_allclose([reused(X[:, j])[0] for j in range(5)], loop, atol=1e-12)
    with pytest.raises(NnobsError, match="x has 199 values, expected 200"):
        reused(X[1:, 0])


def test_input_errors(rng):
    x, y = rng.standard_normal(50), rng.standard_normal(50)
    with pytest.raises(NnobsError, match="49 rows but x has 50"):
        partial_spearman(x, y[:49])
    bad = x.copy()
    bad[[3, 7]] = np.nan
    with pytest.raises(NnobsError, match="x contains 2 NaN values"):
        partial_spearman(bad, y)
    bad[:] = x
    bad[0] = np.inf
    with pytest.raises(NnobsError, match="y contains 1 infinite"):
        partial_spearman(x, bad)
    with pytest.raises(NnobsError, match="covariate column 1 is constant"):
        partial_spearman(x, y, np.column_stack([x + y, np.ones(50)]))
    with pytest.raises(NnobsError, match="^y is constant"):
        partial_spearman(x, np.full(50, 2.0))
    with pytest.raises(NnobsError, match="at least 5 rows"):
        partial_spearman(x[:4], y[:4], np.column_stack([x[:4], y[:4]]))
    with pytest.raises(NnobsError, match="collinear"):
        partial_spearman(x, y, np.column_stack([x + y, np.exp(x + y)]))
    with pytest.raises(NnobsError, match="x column 0 is fully explained"):
        partial_spearman(x, y, 2 * x + 1)


def test_loss_residualizer_recovers_coefficients(rng):
    c = rng.standard_normal((5000, 2))
    loss = 1.5 - 2.0 * c[:, 0] + 0.5 * c[:, 1] + 0.1 * rng.standard_normal(5000)
    res = LossResidualizer().fit(c, loss)
    np.testing.assert_allclose(res.coef_, [-2.0, 0.5], atol=0.01)
    assert res.intercept_ == pytest.approx(1.5, abs=0.01)
    assert res.r2_ > 0.99
    resid = res.residual(c, loss)
    assert resid.std() == pytest.approx(0.1, abs=0.01)
    # OLS residuals are orthogonal to the regressors and centred
    assert abs(resid.mean()) < 1e-10 and np.abs(c.T @ resid).max() < 1e-8
    with pytest.raises(NnobsError, match="must have 2 columns as in fit"):
        res.predict(np.ones((4, 3)))
    with pytest.raises(NnobsError, match="not fitted"):
        LossResidualizer().residual(c, loss)


def test_bootstrap_ci_covers_truth_and_groups_widen(rng):
    # Coverage: 95% intervals for a mean over 40 simulated data sets.
    covered = 0
    for i in range(40):
        x = np.random.default_rng(100 + i).standard_normal(200)
        lo, hi = bootstrap_ci(np.mean, x, n_boot=300, seed=i)
        covered += lo <= 0.0 <= hi
    assert covered >= 34

    # Clustered data: 30 documents of 20 tokens sharing a document effect.
    doc = np.repeat(np.arange(30), 20)
    x = rng.standard_normal(30)[doc] + 0.2 * rng.standard_normal(600)
    lo_r, hi_r = bootstrap_ci(np.mean, x, n_boot=400, seed=1)
    lo_g, hi_g = bootstrap_ci(np.mean, x, n_boot=400, seed=1, groups=doc)
    assert (hi_g - lo_g) > 2.5 * (hi_r - lo_r)
    # true standard error of the mean is ~ 1/sqrt(30): the grouped interval is about 4 of them
    assert 0.5 < hi_g - lo_g < 1.0


def test_bootstrap_ci_resamples_rows_jointly(rng):
    x = rng.standard_normal(300)
    y = x + 0.1 * rng.standard_normal(300)
    lo, hi = bootstrap_ci(lambda a, b: np.corrcoef(a, b)[0, 1], x, y, n_boot=200)
    assert 0.98 < lo < hi < 1.0
    with pytest.raises(NnobsError, match="array 1 has 299 rows"):
        bootstrap_ci(np.mean, x, y[:-1])


def test_grouped_sampler_draws_whole_groups():
    groups = np.array([5, 5, 5, 9, 2, 2])
    draw = bootstrap_sampler(6, groups)
    for seed in range(20):
        idx = draw(np.random.default_rng(seed))
        picked = groups[idx]
        for g, size in ((5, 3), (9, 1), (2, 2)):
            assert (picked == g).sum() % size == 0
        assert len(np.unique(picked)) <= 3


def test_seed_agreement(rng):
    base = rng.standard_normal(500)
    same = [base + 1e-6 * rng.standard_normal(500) for _ in range(3)]
    assert seed_agreement(same) > 0.999
    noisy = [base + rng.standard_normal(500) for _ in range(4)]
    pairwise = [spearmanr(noisy[i], noisy[j])[0] for i in range(4) for j in range(i + 1, 4)]
    assert seed_agreement(noisy) == pytest.approx(np.mean(pairwise), abs=1e-12)
    with pytest.raises(NnobsError, match="at least 2"):
        seed_agreement([base])


def test_detection_floor():
    v = np.arange(101) / 100.0
    floor = detection_floor(v)
    assert floor["floor"] == pytest.approx(0.95)
    assert floor["mean"] == pytest.approx(0.5)
    assert floor["n"] == 101
    assert floor["std"] == pytest.approx(np.std(v, ddof=1))


def test_flag_catches_counts():
    loss = np.array([0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9])  # median 4.5: rows 5..9 are high-loss
    score = np.array([9.0, 8, 7, 6, 5, 4, 3, 2, 1, 10])  # probe ranks rows 9, 0, 1, 2, ...
    conf = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])  # lowest: 9, 8, 7
    r20, r30 = flag_catches(score, conf, loss, rates=(0.2, 0.3))
    # rate 0.2: probe flags {9, 0}, confidence flags {9, 8}
    assert r20["n_flagged"] == 2
    assert r20["probe_precision"] == 0.5 and r20["confidence_precision"] == 1.0
    assert (r20["probe_exclusive"], r20["confidence_exclusive"], r20["overlap"]) == (0, 1, 1)
    # rate 0.3: probe {9, 0, 1}, confidence {9, 8, 7}
    assert (r30["probe_exclusive"], r30["confidence_exclusive"], r30["overlap"]) == (0, 2, 1)
    assert r30["n_high_loss"] == 5
    with pytest.raises(NnobsError, match="flag rates"):
        flag_catches(score, conf, loss, rates=(1.5,))


def test_rank_once_bootstrap_matches_re_ranking_every_resample():
    rng = np.random.default_rng(0)
    n = 4000
    z = rng.standard_normal(n)
    x = z + rng.standard_normal(n)
    y = 0.3 * x + z + rng.standard_normal(n)
    groups = np.arange(n) // 40
    fast = stats.partial_spearman_ci(x, y, z, n_boot=400, groups=groups, seed=1)
    slow = stats.bootstrap_ci(stats.partial_spearman, x, y, z, n_boot=400, groups=groups, seed=1)
    assert fast[0] < stats.partial_spearman(x, y, z) < fast[1]
    np.testing.assert_allclose(fast, slow, atol=0.01)


def test_degenerate_resamples_are_dropped_and_counted_not_fatal():
    # Five documents; the second covariate varies only inside document 0, so every resample
    # that misses document 0 (about a third of them) has a constant covariate: a singular
    # design. The run must go on, with those resamples counted as undefined.
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(5), 40)
    x = rng.standard_normal(200)
    y = 0.5 * x + rng.standard_normal(200)
    c = np.column_stack([rng.standard_normal(200), np.where(groups == 0, x, 0.0)])
    values = stats.partial_spearman_replicates(x, y, c, n_boot=300, groups=groups)
    undefined = np.isnan(values).mean()
    assert 0.2 < undefined < 0.5  # (4/5)^5 = 0.33 of resamples miss document 0
    lo, hi = stats.partial_spearman_ci(x, y, c, n_boot=300, groups=groups)
    assert np.isfinite([lo, hi]).all() and lo < stats.partial_spearman(x, y, c) < hi
    # When most resamples are undefined the interval is refused with one clear line: with
    # three documents, the covariate varying only in one and x only in another, a resample
    # is defined only when it draws both (44%).
    three = np.repeat(np.arange(3), 40)
    x3 = np.where(three == 1, rng.standard_normal(120), 0.0)
    c3 = np.column_stack([rng.standard_normal(120), np.where(three == 0, rng.random(120), 0.0)])
    y3 = x3 + rng.standard_normal(120)
    with pytest.raises(NnobsError, match="bootstrap resamples had a defined statistic"):
        stats.partial_spearman_ci(x3, y3, c3, n_boot=300, groups=three)
