import numpy as np
import pytest
from scipy.stats import ortho_group

from nnobs.core.errors import NnobsError
from nnobs.measure.cka import cka_matrix, is_degenerate, linear_cka, minibatch_cka, unbiased_cka

ESTIMATORS = [linear_cka, unbiased_cka, minibatch_cka]


@pytest.fixture
def X():
    rng = np.random.default_rng(0)
    # anisotropic, with a large offset: the identities must survive both
    return rng.standard_normal((600, 12)) * np.linspace(0.1, 5, 12) + 40.0


def _hsic_gram(K: np.ndarray, L: np.ndarray, unbiased: bool) -> float:
    """The textbook n × n formulas, on uncentred Gram matrices."""
    n = len(K)
    if not unbiased:
        H = np.eye(n) - 1.0 / n
        return np.trace(K @ H @ L @ H) / (n - 1) ** 2
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    one = np.ones(n)
    return (
        np.trace(K @ L)
        + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * (one @ K @ L @ one)
    ) / (n * (n - 3))


@pytest.mark.parametrize("unbiased", [False, True])
def test_matches_gram_formulas(unbiased):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((40, 7)) + 3.0
    Y = X @ rng.standard_normal((7, 5)) + rng.standard_normal((40, 5)) + np.arange(5)
    K, L = X @ X.T, Y @ Y.T
    expected = _hsic_gram(K, L, unbiased) / np.sqrt(
        _hsic_gram(K, K, unbiased) * _hsic_gram(L, L, unbiased)
    )
    got = unbiased_cka(X, Y) if unbiased else linear_cka(X, Y)
    assert 0.2 < expected < 0.95  # a value that tests something
    assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("cka", ESTIMATORS)
def test_invariant_to_rotation_scaling_and_offset(cka, X):
    Q = ortho_group.rvs(12, random_state=3)
    assert cka(X, X @ Q) == pytest.approx(1.0, abs=1e-9)
    assert cka(X, 7.5 * X) == pytest.approx(1.0, abs=1e-9)
    assert cka(X, X - 100.0) == pytest.approx(1.0, abs=1e-9)
    assert cka(X, 0.01 * (X @ Q) + 3.0) == pytest.approx(1.0, abs=1e-9)


def test_not_invariant_to_anisotropic_scaling(X):
    # CKA is not invariant to arbitrary invertible maps: it weights directions by variance
    D = np.diag(np.geomspace(1e-3, 1e3, 12))
    assert linear_cka(X, X @ D) < 0.9


def test_independent_noise():
    rng = np.random.default_rng(2)
    n, d = 4000, 16
    A, B = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    assert abs(unbiased_cka(A, B)) < 0.01
    assert abs(minibatch_cka(A, B, batch_size=500)) < 0.02
    # the plug-in estimator is biased upwards by about d/n, and shrinks with n
    small = linear_cka(A[:200], B[:200])
    assert 0.0 < linear_cka(A, B) < 0.02 < small


def test_symmetric_and_bounded():
    rng = np.random.default_rng(4)
    A = rng.standard_normal((300, 8))
    B = np.tanh(A @ rng.standard_normal((8, 5))) + 0.5 * rng.standard_normal((300, 5))
    for cka in ESTIMATORS:
        ab, ba = cka(A, B), cka(B, A)
        assert ab == pytest.approx(ba, abs=1e-12)
        assert 0.1 < ab < 1.0


def test_minibatch_approaches_full_unbiased():
    rng = np.random.default_rng(5)
    A = rng.standard_normal((4000, 10))
    B = A[:, :4] @ rng.standard_normal((4, 6)) + rng.standard_normal((4000, 6))
    full = unbiased_cka(A, B)
    assert 0.3 < full < 0.9
    assert minibatch_cka(A, B, batch_size=256) == pytest.approx(full, abs=0.03)
    # one batch holding every row is the full estimator exactly
    assert minibatch_cka(A, B, batch_size=4000) == pytest.approx(full, abs=1e-12)
    # consecutive batches and the plug-in flavour run too, and land close
    assert minibatch_cka(A, B, batch_size=256, seed=None) == pytest.approx(full, abs=0.03)
    assert minibatch_cka(A, B, batch_size=256, unbiased=False) == pytest.approx(
        linear_cka(A, B), abs=0.05
    )


@pytest.mark.parametrize("cka", ESTIMATORS)
def test_constant_input_gives_zero_not_nan(cka):
    rng = np.random.default_rng(6)
    A = rng.standard_normal((100, 4))
    const = np.full((100, 3), 2.5, dtype=np.float32)
    assert cka(A, const) == 0.0
    assert cka(const, const) == 0.0
    assert is_degenerate(const) and not is_degenerate(A)
    # a constant plus rounding-level noise is still constant, not a random direction
    nearly = np.full((100, 3), 1e6) + 1e-11 * rng.standard_normal((100, 3))
    assert is_degenerate(nearly)
    assert cka(A, nearly) == 0.0


@pytest.mark.parametrize("cka", ESTIMATORS)
def test_low_rank_inputs(cka):
    rng = np.random.default_rng(7)
    u = rng.standard_normal((200, 1))
    rank1 = u @ rng.standard_normal((1, 9))
    assert cka(rank1, u) == pytest.approx(1.0, abs=1e-9)
    assert cka(rank1, -3 * u + 1) == pytest.approx(1.0, abs=1e-9)
    value = cka(rank1, rng.standard_normal((200, 5)))
    assert np.isfinite(value) and value < 0.1


def test_memmap_and_float16_inputs(tmp_path):
    rng = np.random.default_rng(8)
    A = rng.standard_normal((500, 6)).astype(np.float16)
    path = tmp_path / "a.npy"
    np.save(path, A)
    mm = np.load(path, mmap_mode="r")
    B = A.astype(np.float64) @ rng.standard_normal((6, 6))
    assert linear_cka(mm, B) == pytest.approx(linear_cka(A.astype(np.float64), B), abs=1e-12)


def test_cka_matrix_layers_of_one_model():
    rng = np.random.default_rng(9)
    h0 = rng.standard_normal((400, 8))
    acts = {
        "blocks.0.resid_post": h0,
        "blocks.1.resid_post": h0 @ ortho_group.rvs(8, random_state=1),  # same up to rotation
        "blocks.2.resid_post": rng.standard_normal((400, 5)),  # unrelated
    }
    names_a, names_b, M = cka_matrix(acts)
    assert names_a == names_b == list(acts)
    np.testing.assert_allclose(M, M.T)
    np.testing.assert_allclose(np.diag(M), 1.0)
    assert M[0, 1] == pytest.approx(1.0, abs=1e-9)
    assert M[0, 2] < 0.1 and M[1, 2] < 0.1
    expected = linear_cka(acts["blocks.0.resid_post"], acts["blocks.2.resid_post"])
    assert M[0, 2] == pytest.approx(expected)


def test_cka_matrix_across_checkpoints():
    rng = np.random.default_rng(10)
    early = {"l0": rng.standard_normal((300, 6)), "l1": rng.standard_normal((300, 6))}
    late = {"l0": early["l0"] * 2.0, "l1": rng.standard_normal((300, 6)), "l2": early["l1"]}
    for method in ("linear", "unbiased", "minibatch"):
        rows, cols, M = cka_matrix(early, late, method=method, batch_size=100)
        assert (rows, cols, M.shape) == (["l0", "l1"], ["l0", "l1", "l2"], (2, 3))
        assert M[0, 0] == pytest.approx(1.0, abs=1e-9)  # layer 0 kept its representation
        assert M[1, 2] == pytest.approx(1.0, abs=1e-9)  # layer 1's moved up to layer 2
        assert abs(M[1, 1]) < 0.15  # layer 1 was replaced


def test_bad_inputs():
    rng = np.random.default_rng(11)
    A = rng.standard_normal((50, 3))
    with pytest.raises(NnobsError, match="same tokens"):
        linear_cka(A, A[:40])
    with pytest.raises(NnobsError, match="2-D"):
        linear_cka(A[:, 0], A)
    with pytest.raises(NnobsError, match="NaN"):
        linear_cka(A, np.where(A > 2, np.nan, A))
    with pytest.raises(NnobsError, match="at least 4"):
        unbiased_cka(A[:3], A[:3])
    with pytest.raises(NnobsError, match="unknown CKA method"):
        cka_matrix({"a": A}, method="rbf")
    with pytest.raises(NnobsError, match="same tokens"):
        cka_matrix({"a": A, "b": A[:10]})
