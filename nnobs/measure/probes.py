"""Linear probes: estimators that read a score out of activations (scikit-learn style).

:class:`LinearProbe` is logistic regression solved to its optimum; :class:`RandomHead` is the
null probe, a random direction; :func:`linear_scores` scores many of them in one product.
Parameters are stored as given in ``__init__`` and checked in ``fit``; ``fit`` returns the
probe; learned state ends in an underscore. Torch does the arithmetic, on ``device``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from nnobs.core.errors import NnobsError
from nnobs.measure.arrays import (
    activation_shape,
    check_rows_finite,
    check_width,
    fits_one_block,
    row_blocks,
    to_tensor,
    weighted_moments,
)
from nnobs.measure.stats import bootstrap_sampler, check_finite


def binary_labels(y: np.ndarray, n: int) -> np.ndarray:
    """``y`` as float64 0/1 labels, one per activation row, with both classes present."""
    y = np.asarray(y)
    if y.shape != (n,):
        raise NnobsError(f"labels must have one value per activation row ({n}), got {y.shape}")
    check_finite("labels", y)
    y = y.astype(np.float64)
    if not np.isin(y, (0.0, 1.0)).all():
        raise NnobsError("labels must be binary (0/1 or bool); threshold them first")
    if y.min() == y.max():
        raise NnobsError(
            f"labels are all {int(y[0])}: a probe needs both classes; check the labelling"
        )
    return y


class LinearScorer:
    """A linear score ``X @ coef_ + intercept_`` on raw activations; subclasses fit it."""

    coef_: np.ndarray
    intercept_: float
    device: str = "cpu"

    def _require_fit(self) -> None:
        if not hasattr(self, "coef_"):
            raise NnobsError(f"{type(self).__name__} is not fitted; call fit() first")

    @property
    def direction(self) -> np.ndarray:
        """Unit-norm coefficient vector in raw activation space (for causal tests)."""
        self._require_fit()
        return self.coef_ / np.linalg.norm(self.coef_)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Scores, one per row, float64; reads ``X`` in row chunks (memmaps are fine)."""
        return linear_scores([self], X)[:, 0]


def linear_scores(scorers: Sequence[LinearScorer], X: np.ndarray) -> np.ndarray:
    """Scores of several fitted linear scorers on ``X`` as one ``(n, m)`` float64 array.

    One product with all their coefficient vectors, so ``X`` is read (and converted) once
    however many seeds or random heads there are. Runs on the first scorer's device.
    """
    for scorer in scorers:
        scorer._require_fit()
        check_width(X, len(scorer.coef_))
    device = scorers[0].device
    W = torch.as_tensor(np.column_stack([s.coef_ for s in scorers]), dtype=torch.float32)
    W = W.to(device)
    out = np.empty((X.shape[0], len(scorers)))
    for a, b, block in row_blocks(X):
        out[a:b] = (block.to(device) @ W).double().cpu().numpy()
    return out + np.array([s.intercept_ for s in scorers])


class BinaryProbe(LinearScorer):
    """A linear scorer of a binary label, judged by the reference objective (with penalty
    ``l2``) and by ROC AUC."""

    l2: float

    def objective(self, X: np.ndarray, y: np.ndarray) -> float:
        """The reference objective on ``(X, y)``: mean BCE-with-logits + (l2/2)(|w|² + b²)."""
        scores = self.decision_function(X)
        y = binary_labels(y, len(scores))
        bce = np.logaddexp(0.0, scores) - y * scores
        penalty = 0.5 * self.l2 * (float(self.coef_ @ self.coef_) + self.intercept_**2)
        return float(bce.mean()) + penalty

    def score(self, X: np.ndarray, y: np.ndarray) -> float:
        """ROC AUC of the scores for labels ``y`` (threshold-free, unlike accuracy)."""
        scores = self.decision_function(X)
        return float(roc_auc_score(binary_labels(y, len(scores)), scores))


class LinearProbe(BinaryProbe):
    """Logistic-regression probe for a binary label, solved to its optimum.

    Minimises the reference probe's objective on the raw activations,
    ``mean BCE-with-logits(X w + b, y) + (l2/2)(|w|² + b²)`` (the reference trains
    ``Linear(d, 1)`` with Adam and coupled weight decay ``l2``, which is this penalty), with
    full-batch L-BFGS. The search is preconditioned: it runs in coordinates where the
    objective's Hessian at the start (the activation covariance times p(1-p), plus the
    penalty's) is the identity, which costs one ``d × d`` product over the data and makes the
    anisotropy of real activations harmless. That is a linear change of variables only; the
    penalty stays on the raw ``w, b``, so the optimum is the stated one.
    ``tol`` bounds the gradient in those coordinates relative to its start; there the
    objective's excess over its optimum is about half the squared gradient norm, so the
    default 1e-4 leaves an excess far below anything that changes a score's ranks.

    **Seeds.** The objective is strictly convex, so initialisation cannot make seeds differ.
    With ``resample=True`` (the default) a seed selects a bootstrap resample of the training
    rows (whole ``groups`` such as documents, when given, else single rows) and the probe is
    fit to that resample; seed-to-seed variation then measures how much the probe depends on
    the particular training tokens. ``resample=False`` fits all rows, ignores the seed, and is
    deterministic.
    """

    def __init__(
        self,
        l2: float = 1e-4,
        seed: int = 42,
        resample: bool = True,
        max_iter: int = 500,
        tol: float = 1e-4,
        device: str = "cpu",
    ) -> None:
        self.l2 = l2
        self.seed = seed
        self.resample = resample
        self.max_iter = max_iter
        self.tol = tol
        self.device = device

    def _check_params(self) -> None:
        if self.l2 <= 0:
            raise NnobsError(f"l2 must be positive (it makes the optimum unique), got {self.l2}")

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> LinearProbe:
        self._check_params()
        n, _ = activation_shape(X)
        y = binary_labels(y, n)
        rows, weight = None, np.full(n, 1.0 / n)
        if self.resample:
            check_rows_finite(X)  # rows left out of the resample must not hide bad values
            rows, weight = self._resample(n, groups)
            y = _resampled_labels(y, rows)
        dev = torch.device(self.device)
        with _one_cpu_thread(dev, n * X.shape[1]):
            Xt = to_tensor(X, rows, dev)
            wt = torch.as_tensor(weight, device=dev)
            mean, cov = weighted_moments(Xt, wt)
            p = float(y @ weight)
            chol = _preconditioner(mean, cov, p * (1 - p), self.l2)
            return self._solve(Xt, y, weight, mean, chol)

    def _resample(self, n: int, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """This seed's bootstrap resample: the distinct rows drawn (sorted), and their weights
        (how often each was drawn, normalised)."""
        drawn = bootstrap_sampler(n, groups)(np.random.default_rng(self.seed))
        rows, counts = np.unique(drawn, return_counts=True)
        return rows, counts / counts.sum()

    def _solve(
        self,
        Xt: torch.Tensor,
        y: np.ndarray,
        weight: np.ndarray,
        mean: torch.Tensor,
        chol: torch.Tensor,
    ) -> LinearProbe:
        """Minimise the weighted objective on rows ``Xt``, searching in the coordinates that
        ``mean`` and ``chol`` define (any choice gives the same optimum; a good one, few
        iterations)."""
        dev, d = Xt.device, Xt.shape[1]
        yt = torch.as_tensor(y, device=dev)
        wt = torch.as_tensor(weight, device=dev)
        p = float(y @ weight)

        # The search runs in theta = chol^T [w; c], c = b + mean·w (the centred intercept):
        # there the objective's Hessian at the start is the identity, so the first step is
        # Newton's and L-BFGS needs few more.
        def raw(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            phi = torch.linalg.solve_triangular(chol.T, theta[:, None], upper=True)[:, 0]
            return phi[:d], phi[d] - mean @ phi[:d]

        def value_and_grad(theta: torch.Tensor) -> tuple[float, torch.Tensor]:
            w, b = raw(theta)
            z = (Xt @ w.float()).double() + b
            value = wt @ (torch.logaddexp(z, torch.zeros_like(z)) - yt * z)
            value += 0.5 * self.l2 * (w @ w + b * b)
            r = wt * (torch.sigmoid(z) - yt)
            grad_b = r.sum() + self.l2 * b
            grad_w = (r.float() @ Xt).double() + self.l2 * w - grad_b * mean
            grad_phi = torch.cat([grad_w, grad_b[None]])
            grad = torch.linalg.solve_triangular(chol, grad_phi[:, None], upper=False)[:, 0]
            return float(value), grad

        phi0 = torch.zeros(d + 1, dtype=torch.float64, device=dev)
        phi0[d] = math.log(p / (1 - p))
        theta, self.n_iter_, self.converged_ = _lbfgs(
            value_and_grad, chol.T @ phi0, self.tol, self.max_iter
        )
        w, b = raw(theta)
        self.coef_ = w.cpu().numpy()
        self.intercept_ = float(b)
        return self


def fit_resampled(
    X: np.ndarray,
    y: np.ndarray,
    seeds: Sequence[int],
    groups: np.ndarray | None = None,
    **params: Any,
) -> list[LinearProbe]:
    """``[LinearProbe(seed=s, **params).fit(X, y, groups) for s in seeds]``, sharing the work
    that does not depend on the seed.

    ``X`` is read, checked and converted to float32 once (held in memory, with one resample's
    rows at a time beside it), and one preconditioner from all rows serves every resample. The
    preconditioner is only a change of variables, so each probe's optimum is still its own
    resample's; a resample's covariance is close to the full one, so the search stays short.
    """
    n, _ = activation_shape(X)
    y = binary_labels(y, n)
    probes = [LinearProbe(seed=seed, resample=True, **params) for seed in seeds]
    if not probes:
        return []
    probes[0]._check_params()  # the parameters all probes share
    dev = torch.device(probes[0].device)
    with _one_cpu_thread(dev, n * X.shape[1]):
        Xt = to_tensor(X, None, dev)
        uniform = torch.full((n,), 1.0 / n, dtype=torch.float64, device=dev)
        mean, cov = weighted_moments(Xt, uniform)
        p = float(y.mean())
        chol = _preconditioner(mean, cov, p * (1 - p), probes[0].l2)
        for probe in probes:
            rows, weight = probe._resample(n, groups)
            picked = Xt.index_select(0, torch.as_tensor(rows, device=dev))
            probe._solve(picked, _resampled_labels(y, rows), weight, mean, chol)
    return probes


@contextmanager
def _one_cpu_thread(device: torch.device, elements: int) -> Iterator[None]:
    """Fit on one CPU thread when the data (``elements`` activation values) fit in one row
    block. A fit is a covariance product and matrix-vector products and elementwise passes over
    vectors of scores; on data that small, splitting them across threads costs more than it
    saves (7 seeds' fits on 44.8 k × 128 rows: about half the time on one thread of two), while
    larger passes gain from every thread. Torch's thread count is process-wide; it is restored
    on exit."""
    before = torch.get_num_threads()
    if device.type != "cpu" or before == 1 or not fits_one_block(elements):
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _resampled_labels(y: np.ndarray, rows: np.ndarray) -> np.ndarray:
    y = y[rows]
    if y.min() == y.max():
        raise NnobsError("the bootstrap resample holds one class only; use more rows")
    return y


# Backtracking gives up after this many halvings of the step (a 1/1024 step still failing
# to decrease the objective means the decrease is below rounding).
_MAX_HALVINGS = 10


def _lbfgs(
    value_and_grad, x: torch.Tensor, tol: float, max_iter: int, history: int = 10
) -> tuple[torch.Tensor, int, bool]:
    """Minimise a smooth strictly convex function by L-BFGS with Armijo backtracking.

    Returns ``(x, iterations, converged)``. Converged: ``max|grad|`` fell to ``tol`` times its
    starting value, or a step's decrease fell to float rounding (relative 1e-12). The unit
    step is tried first: in well-preconditioned coordinates it is nearly always accepted, so
    an iteration costs one evaluation. Strict convexity keeps every curvature pair positive,
    so no Wolfe curvature test is needed.
    """
    value, grad = value_and_grad(x)
    limit = tol * float(grad.abs().max())
    pairs: list[tuple[torch.Tensor, torch.Tensor, float]] = []
    for it in range(max_iter):
        if float(grad.abs().max()) <= limit:
            return x, it, True
        q = grad.clone()
        alphas = []
        for s, yv, rho in reversed(pairs):
            alphas.append(rho * float(s @ q))
            q -= alphas[-1] * yv
        if pairs:
            s, yv, _ = pairs[-1]
            q *= float(s @ yv) / float(yv @ yv)
        for (s, yv, rho), alpha in zip(pairs, reversed(alphas), strict=True):
            q += (alpha - rho * float(yv @ q)) * s
        direction = -q
        slope = float(grad @ direction)
        for halvings in range(_MAX_HALVINGS + 1):
            step = 0.5**halvings
            x_new = x + step * direction
            value_new, grad_new = value_and_grad(x_new)
            if value_new <= value + 1e-4 * step * slope:
                break
        else:  # no decrease measurable along a descent direction: rounding noise level
            return x, it, False
        s, yv = x_new - x, grad_new - grad
        sy = float(s @ yv)
        if sy > 0:
            pairs = [*pairs[-(history - 1) :], (s, yv, 1.0 / sy)]
        stalled = value - value_new <= 1e-12 * max(1.0, abs(value))
        x, value, grad = x_new, value_new, grad_new
        if stalled:
            return x, it + 1, True
    return x, max_iter, float(grad.abs().max()) <= limit


def _preconditioner(
    mean: torch.Tensor, cov: torch.Tensor, curvature: float, l2: float
) -> torch.Tensor:
    """Cholesky factor of the objective's Hessian at the constant predictor, in ``[w; c]``.

    Data term: ``curvature·diag(cov, 1)``, exact while every prediction equals the base rate.
    Penalty ``(l2/2)(|w|² + (c - mean·w)²)``: its exact (constant) Hessian.
    """
    d = len(mean)
    eye = torch.eye(d + 1, dtype=torch.float64, device=mean.device)
    h = l2 * eye
    h[:d, :d] += curvature * cov + l2 * torch.outer(mean, mean)
    h[:d, d] = h[d, :d] = -l2 * mean
    h[d, d] += curvature
    chol, info = torch.linalg.cholesky_ex(h)
    jitter = 1e-12 * float(torch.diagonal(h).mean())
    while int(info) != 0:  # only float rounding can make h indefinite; nudge it
        chol, info = torch.linalg.cholesky_ex(h + jitter * eye)
        jitter *= 10
    return chol


class RandomHead(LinearScorer):
    """A uniformly random unit direction (no bias): the null probe behind the detection floor.

    The direction depends only on ``seed`` and the width ``d``; ``fit`` draws it.
    """

    def __init__(self, seed: int = 0, device: str = "cpu") -> None:
        self.seed = seed
        self.device = device

    def fit(
        self, X: np.ndarray, y: np.ndarray | None = None, groups: np.ndarray | None = None
    ) -> RandomHead:
        """Draw the direction for ``X``'s width; the data are not looked at."""
        _, d = activation_shape(X)
        v = np.random.default_rng(self.seed).standard_normal(d)
        self.coef_, self.intercept_ = v / np.linalg.norm(v), 0.0
        return self


def random_head_scores(X: np.ndarray, n: int) -> np.ndarray:
    """Scores ``(len(X), n)`` of the random heads with seeds ``0 .. n-1``, in one product."""
    return linear_scores([RandomHead(seed=s).fit(X) for s in range(n)], X)
