"""Representation similarity: linear CKA between two sets of activations on the same tokens.

CKA compares two representations ``X`` (n × d1) and ``Y`` (n × d2) of the same n tokens by
the alignment of their (linear-kernel) Gram matrices: ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``
with ``K = X Xᵀ``, ``L = Y Yᵀ``. It is invariant to orthogonal transforms and isotropic scaling
of either side and to adding a constant to every row, and it needs no correspondence between
the two feature spaces, so it compares layers of one model, one layer across checkpoints, and
layers of different models.

Three estimators:

- :func:`linear_cka`: the plug-in (biased) HSIC, ``‖Xcᵀ Yc‖_F² / (‖Xcᵀ Xc‖_F ‖Ycᵀ Yc‖_F)`` on
  column-centred data. In [0, 1]; independent representations give about ``d/n`` rather than 0,
  so compare values at equal token counts.
- :func:`unbiased_cka`: the same ratio with Song et al.'s (2012) unbiased HSIC estimator;
  independent representations give about 0 (small negative values happen), so it is the one
  to use when n is not much larger than the widths.
- :func:`minibatch_cka`: Nguyen et al.'s (2021) estimator for large token counts: each HSIC
  term is averaged over minibatches (unbiased per batch) and the ratio is taken at the end.

All three work in feature space, read the arrays in row blocks (memory-maps are fine) and
compute in float64. No NaN: a side with zero variance (a constant representation, which has
no Gram structure to compare) gets CKA 0.0 by convention, and :func:`is_degenerate` says
when that applies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from nnobs.core.errors import NnobsError
from nnobs.measure.arrays import chunk_rows
from nnobs.measure.stats import check_finite

Method = Literal["linear", "unbiased", "minibatch"]
METHODS = ("linear", "unbiased", "minibatch")
# Centred variance below this fraction of the raw second moment is rounding noise around a
# constant (float64 centring leaves ~1e-32 of it), so the side is treated as constant.
_CONSTANT_RTOL = 1e-24


def _shape(name: str, X: np.ndarray) -> tuple[int, int]:
    shape = getattr(X, "shape", None)
    if shape is None or len(shape) != 2:
        raise NnobsError(f"{name} must be a 2-D (tokens, features) array, got shape {shape}")
    if shape[0] == 0 or shape[1] == 0:
        raise NnobsError(f"{name} is empty (shape {tuple(shape)}); capture some tokens first")
    return int(shape[0]), int(shape[1])


def _pair_shape(X: np.ndarray, Y: np.ndarray, min_rows: int = 2) -> int:
    n, _ = _shape("X", X)
    m, _ = _shape("Y", Y)
    if n != m:
        raise NnobsError(
            f"X has {n} rows but Y has {m}: CKA compares two representations of the same "
            "tokens, so capture both on the same windows"
        )
    if n < min_rows:
        raise NnobsError(f"CKA needs at least {min_rows} tokens here, got {n}")
    return n


def _block(X: np.ndarray, rows: slice | np.ndarray, name: str) -> torch.Tensor:
    """Rows of ``X`` as a float64 tensor (torch: its CPU matmul is much faster than numpy's)."""
    b = np.asarray(X[rows], dtype=np.float64)
    check_finite(name, b)
    return torch.from_numpy(b)


@dataclass(frozen=True)
class _Moments:
    mean: torch.Tensor  # column means, float64
    raw_ss: float  # sum of squares before centring (the scale for the constant test)


def _moments(X: np.ndarray, name: str) -> _Moments:
    n, d = _shape(name, X)
    step = chunk_rows(d)
    total = torch.zeros(d, dtype=torch.float64)
    raw_ss = 0.0
    for a in range(0, n, step):
        b = _block(X, slice(a, a + step), name)
        total += b.sum(0)
        raw_ss += float((b * b).sum())
    return _Moments(total / n, raw_ss)


@dataclass
class _Terms:
    """Sufficient statistics of a pair of centred blocks for both HSIC estimators.

    ``cross = ‖Xcᵀ Yc‖_F² = tr(K L)``; ``kd``/``ld`` are the Gram diagonals (row squared
    norms), summed as ``skd``, ``sld`` and ``skl = Σ kd·ld``.
    """

    n: int = 0
    cross: float = 0.0
    skd: float = 0.0
    sld: float = 0.0
    skl: float = 0.0

    def hsic(self, unbiased: bool) -> float:
        n = self.n
        if not unbiased:
            return self.cross / (n - 1) ** 2
        # Song et al. 2012 with K, L of centred data (the estimator is invariant to centring):
        # there 1ᵀK̃1 = -Σkd and K̃1 = -kd, with K̃ the Gram matrix with its diagonal zeroed.
        trace = self.cross - self.skl
        return (trace + self.skd * self.sld / ((n - 1) * (n - 2)) - 2.0 * self.skl / (n - 2)) / (
            n * (n - 3)
        )


def _cross_sq(x: torch.Tensor, y: torch.Tensor) -> float:
    """``‖xᵀ y‖_F²``, through whichever of the feature or Gram products is smaller."""
    if x.shape[0] ** 2 < x.shape[1] * y.shape[1]:
        return float(((x @ x.T) * (y @ y.T)).sum())
    return float(torch.linalg.matrix_norm(x.T @ y) ** 2)


def _accumulate(terms: _Terms, x: torch.Tensor, y: torch.Tensor, same: bool) -> None:
    kd = (x * x).sum(1)
    ld = kd if same else (y * y).sum(1)
    terms.n += len(x)
    terms.skd += float(kd.sum())
    terms.sld += float(ld.sum())
    terms.skl += float(kd @ ld)


def _full_terms(X: np.ndarray, Y: np.ndarray, mx: _Moments, my: _Moments, same: bool) -> _Terms:
    """Terms over all rows, centred by the global means; ``Xcᵀ Yc`` accumulated blockwise."""
    n, d1 = _shape("X", X)
    d2 = _shape("Y", Y)[1]
    step = chunk_rows(max(d1, d2))
    terms = _Terms()
    cross = torch.zeros((d1, d2), dtype=torch.float64)
    for a in range(0, n, step):
        x = _block(X, slice(a, a + step), "X") - mx.mean
        y = x if same else _block(Y, slice(a, a + step), "Y") - my.mean
        cross += x.T @ y
        _accumulate(terms, x, y, same)
    terms.cross = float(torch.linalg.matrix_norm(cross) ** 2)
    return terms


def _batches(n: int, batch_size: int, seed: int | None) -> list[np.ndarray]:
    """Row indices of each minibatch (sorted, for memmap reads); a tail under 4 rows dropped."""
    if batch_size < 4:
        raise NnobsError(f"batch_size must be at least 4 (unbiased HSIC needs 4), got {batch_size}")
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    out = [np.sort(order[a : a + batch_size]) for a in range(0, n, batch_size)]
    return [b for b in out if len(b) >= 4]


def _batch_hsic(
    X: np.ndarray, Y: np.ndarray, batches: list[np.ndarray], unbiased: bool, same: bool
) -> tuple[float, bool]:
    """Mean per-batch HSIC, and whether the inputs were constant in every batch."""
    total, constant = 0.0, True
    for rows in batches:
        x = _block(X, rows, "X")
        y = x if same else _block(Y, rows, "Y")
        raw_ss = float((x * x).sum())
        x = x - x.mean(0)
        y = x if same else y - y.mean(0)
        terms = _Terms(cross=_cross_sq(x, y))
        _accumulate(terms, x, y, same)
        total += terms.hsic(unbiased)
        constant &= terms.skd <= _CONSTANT_RTOL * raw_ss
    return total / len(batches), constant


def _ratio(hxy: float, hxx: float, hyy: float, unbiased: bool) -> float:
    if hxx <= 0.0 or hyy <= 0.0:
        return 0.0
    value = hxy / np.sqrt(hxx * hyy)
    return float(np.clip(value, -1.0 if unbiased else 0.0, 1.0))


class _Side:
    """One representation with what every pair involving it can reuse: means, self-HSIC."""

    def __init__(
        self,
        X: np.ndarray,
        name: str,
        unbiased: bool,
        batches: list[np.ndarray] | None = None,
    ):
        self.X, self.unbiased, self.batches = X, unbiased, batches
        if batches is None:
            self.moments = _moments(X, name)
            terms = _full_terms(X, X, self.moments, self.moments, same=True)
            self.constant = terms.skd <= _CONSTANT_RTOL * self.moments.raw_ss
            self.hsic = terms.hsic(unbiased)
        else:
            self.hsic, self.constant = _batch_hsic(X, X, batches, unbiased, same=True)

    def cka(self, other: _Side) -> float:
        if self.constant or other.constant:
            return 0.0  # the convention: no variance, nothing to align
        if self.X is other.X:
            return 1.0 if self.hsic > 0 else 0.0
        if self.batches is None:
            terms = _full_terms(self.X, other.X, self.moments, other.moments, same=False)
            hxy = terms.hsic(self.unbiased)
        else:
            hxy, _ = _batch_hsic(self.X, other.X, self.batches, self.unbiased, same=False)
        return _ratio(hxy, self.hsic, other.hsic, self.unbiased)


def linear_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Linear CKA with the plug-in HSIC, in [0, 1]; 0.0 if either side is constant."""
    _pair_shape(X, Y, min_rows=2)
    return _Side(X, "X", unbiased=False).cka(_Side(Y, "Y", unbiased=False))


def unbiased_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Linear CKA with the unbiased HSIC estimator (Song et al. 2012); needs n ≥ 4.

    About 0 for independent representations at any n (it can be slightly negative); 0.0 if
    either side is constant.
    """
    _pair_shape(X, Y, min_rows=4)
    return _Side(X, "X", unbiased=True).cka(_Side(Y, "Y", unbiased=True))


def minibatch_cka(
    X: np.ndarray,
    Y: np.ndarray,
    batch_size: int = 1024,
    unbiased: bool = True,
    seed: int | None = 0,
) -> float:
    """Minibatch CKA (Nguyen et al. 2021): per-batch HSIC averaged, then the CKA ratio.

    Rows are dealt into batches by a permutation drawn from ``seed`` (``None``: consecutive
    rows), so a batch mixes documents; a last batch of fewer than 4 rows is dropped. With the
    unbiased per-batch HSIC the value does not depend on the batch size in expectation.
    """
    n = _pair_shape(X, Y, min_rows=4)
    batches = _batches(n, batch_size, seed)
    return _Side(X, "X", unbiased, batches).cka(_Side(Y, "Y", unbiased, batches))


def is_degenerate(X: np.ndarray) -> bool:
    """True when ``X`` has (numerically) no variance, so every CKA involving it is 0.0."""
    return _Side(X, "X", unbiased=False).constant


def cka_matrix(
    acts_a: Mapping[str, np.ndarray],
    acts_b: Mapping[str, np.ndarray] | None = None,
    method: Method = "linear",
    batch_size: int = 1024,
    seed: int | None = 0,
) -> tuple[list[str], list[str], np.ndarray]:
    """CKA between every site of ``acts_a`` and every site of ``acts_b`` (default: ``acts_a``).

    ``acts_a`` and ``acts_b`` map site names to ``(n, d)`` activations of the same n tokens:
    layers of one model (``acts_b`` omitted; the matrix is symmetric with a unit diagonal),
    two checkpoints of one model (its diagonal is each layer against itself over training), or
    two models. Each site's self-similarity is computed once and reused. Returns the row
    names, the column names and the ``(len(a), len(b))`` matrix.
    """
    if method not in METHODS:
        raise NnobsError(f"unknown CKA method {method!r}: use one of {', '.join(METHODS)}")
    if not acts_a or (acts_b is not None and not acts_b):
        raise NnobsError("cka_matrix needs at least one site on each side")
    sets = [acts_a] if acts_b is None else [acts_a, acts_b]
    named = [(name, X) for acts in sets for name, X in acts.items()]
    n = _shape(named[0][0], named[0][1])[0]
    for name, X in named:
        if _shape(name, X)[0] != n:
            raise NnobsError(
                f"site {name!r} has {X.shape[0]} rows but {named[0][0]!r} has {n}: every "
                "representation must cover the same tokens"
            )
    if n < (2 if method == "linear" else 4):
        raise NnobsError(f"CKA ({method}) needs more tokens, got {n}")
    unbiased = method != "linear"
    batches = _batches(n, batch_size, seed) if method == "minibatch" else None

    def sides(acts: Mapping[str, np.ndarray]) -> list[_Side]:
        return [_Side(X, name, unbiased, batches) for name, X in acts.items()]

    rows = sides(acts_a)
    cols = rows if acts_b is None else sides(acts_b)
    matrix = np.empty((len(rows), len(cols)))
    for i, a in enumerate(rows):
        for j, b in enumerate(cols):
            if acts_b is None and j < i:
                matrix[i, j] = matrix[j, i]
            else:
                matrix[i, j] = a.cka(b)
    names_b = list(acts_a if acts_b is None else acts_b)
    return list(acts_a), names_b, matrix
