"""Probes: small estimators that read a score out of activations (scikit-learn style).

Activations arrive as ``(n, d)`` arrays, float16/float32/float64, in memory or memory-mapped;
they are converted to float32 torch tensors in row chunks, so a float16 memmap never
becomes a float64 copy. Torch does the arithmetic, on ``device``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.metrics import roc_auc_score

from nnobs.core.errors import NnobsError
from nnobs.measure.stats import as_covariates, as_vector, bootstrap_sampler, check_finite

# Row blocks hold about this many elements (64 MiB as float32), whatever the width.
CHUNK_ELEMENTS = 1 << 24


def chunk_rows(d: int) -> int:
    """Rows per block for width ``d``."""
    return max(1, CHUNK_ELEMENTS // d)


def _shape(X: np.ndarray) -> tuple[int, int]:
    if len(getattr(X, "shape", ())) != 2:
        raise NnobsError(
            f"activations must be a 2-D (tokens, features) array, got shape {np.shape(X)}"
        )
    n, d = X.shape
    if n == 0 or d == 0:
        raise NnobsError(f"activations are empty (shape {X.shape}); capture some tokens first")
    return n, d


def _row_blocks(
    X: np.ndarray, rows: np.ndarray | None = None
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, stop, block)``: float32 CPU tensors of row blocks of ``X`` (or of
    ``X[rows]``), checked finite. ``start:stop`` indexes the output, not ``X``.

    Torch converts the dtype: for float16 it is several times faster than numpy's ``astype``.
    """
    total = X.shape[0] if rows is None else len(rows)
    step = chunk_rows(X.shape[1])
    for a in range(0, total, step):
        b = min(a + step, total)
        block = np.asarray(X[a:b] if rows is None else X[rows[a:b]])
        if not (block.flags.writeable and block.flags.c_contiguous):
            block = np.array(block)  # a read-only memmap view: torch wants its own memory
        tensor = torch.from_numpy(block).float()
        # A NaN or inf anywhere makes the sum non-finite, and a sum is far cheaper than an
        # elementwise test; only a (rare) overflowing sum needs the exact check.
        if not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
            first, last = (a, b - 1) if rows is None else (rows[a], rows[b - 1])
            check_finite(f"activations (rows {first}..{last})", block)
            raise NnobsError(
                f"activations (rows {first}..{last}) exceed the float32 range; rescale them"
            )
        yield a, b, tensor


def check_rows_finite(X: np.ndarray) -> None:
    """Raise ``NnobsError`` if any row of ``X`` holds NaN or inf (reads ``X`` once, in blocks)."""
    for _ in _row_blocks(X):
        pass


def to_tensor(
    X: np.ndarray, rows: np.ndarray | None = None, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """``X`` (or ``X[rows]``, rows sorted) as one float32 ``(n, d)`` tensor on ``device``.

    A writable float32 C-contiguous array on the CPU is shared, not copied.
    """
    _, d = _shape(X)
    device = torch.device(device)
    shareable = (
        rows is None
        and device.type == "cpu"
        and type(X) is np.ndarray
        and X.dtype == np.float32
        and X.flags.c_contiguous
        and X.flags.writeable
    )
    if shareable:
        check_rows_finite(X)
        return torch.from_numpy(X)
    out = torch.empty((X.shape[0] if rows is None else len(rows), d), device=device)
    for a, b, block in _row_blocks(X, rows):
        out[a:b] = block.to(device)
    return out


def _binary_labels(y: np.ndarray, n: int) -> np.ndarray:
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


def _check_width(X: np.ndarray, d: int) -> None:
    if _shape(X)[1] != d:
        raise NnobsError(f"activations have {X.shape[1]} features but the probe was fit on {d}")


class _LinearScorer:
    """A linear score ``X @ coef_ + intercept_`` on raw activations."""

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


def linear_scores(scorers: Sequence[_LinearScorer], X: np.ndarray) -> np.ndarray:
    """Scores of several fitted linear scorers on ``X`` as one ``(n, m)`` float64 array.

    One product with all their coefficient vectors, so ``X`` is read (and converted) once
    however many seeds or random heads there are. Runs on the first scorer's device.
    """
    for scorer in scorers:
        scorer._require_fit()
        _check_width(X, len(scorer.coef_))
    device = scorers[0].device
    W = torch.as_tensor(np.column_stack([s.coef_ for s in scorers]), dtype=torch.float32)
    W = W.to(device)
    out = np.empty((X.shape[0], len(scorers)))
    for a, b, block in _row_blocks(X):
        out[a:b] = (block.to(device) @ W).double().cpu().numpy()
    return out + np.array([s.intercept_ for s in scorers])


class _BinaryProbe(_LinearScorer):
    l2: float

    def objective(self, X: np.ndarray, y: np.ndarray) -> float:
        """The reference objective on ``(X, y)``: mean BCE-with-logits + (l2/2)(|w|² + b²)."""
        scores = self.decision_function(X)
        y = _binary_labels(y, len(scores))
        bce = np.logaddexp(0.0, scores) - y * scores
        penalty = 0.5 * self.l2 * (float(self.coef_ @ self.coef_) + self.intercept_**2)
        return float(bce.mean()) + penalty

    def score(self, X: np.ndarray, y: np.ndarray) -> float:
        """ROC AUC of the scores for labels ``y`` (threshold-free, unlike accuracy)."""
        scores = self.decision_function(X)
        return float(roc_auc_score(_binary_labels(y, len(scores)), scores))


class LinearProbe(_BinaryProbe):
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
        if l2 <= 0:
            raise NnobsError(f"l2 must be positive (it makes the optimum unique), got {l2}")
        self.l2, self.seed, self.resample = l2, seed, resample
        self.max_iter, self.tol, self.device = max_iter, tol, device

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> LinearProbe:
        n, _ = _shape(X)
        y = _binary_labels(y, n)
        rows, weight = None, np.full(n, 1.0 / n)
        if self.resample:
            check_rows_finite(X)  # rows left out of the resample must not hide bad values
            rows, weight = self._resample(n, groups)
            y = _resampled_labels(y, rows)
        dev = torch.device(self.device)
        with _one_cpu_thread(dev, n * X.shape[1]):
            Xt = to_tensor(X, rows, dev)
            wt = torch.as_tensor(weight, device=dev)
            mean, cov = _weighted_moments(Xt, wt)
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
    **params,
) -> list[LinearProbe]:
    """``[LinearProbe(seed=s, **params).fit(X, y, groups) for s in seeds]``, sharing the work
    that does not depend on the seed.

    ``X`` is read, checked and converted to float32 once (held in memory, with one resample's
    rows at a time beside it), and one preconditioner from all rows serves every resample. The
    preconditioner is only a change of variables, so each probe's optimum is still its own
    resample's; a resample's covariance is close to the full one, so the search stays short.
    """
    n, _ = _shape(X)
    y = _binary_labels(y, n)
    probes = [LinearProbe(seed=seed, resample=True, **params) for seed in seeds]
    if not probes:
        return []
    dev = torch.device(probes[0].device)
    with _one_cpu_thread(dev, n * X.shape[1]):
        Xt = to_tensor(X, None, dev)
        uniform = torch.full((n,), 1.0 / n, dtype=torch.float64, device=dev)
        mean, cov = _weighted_moments(Xt, uniform)
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
    if device.type != "cpu" or before == 1 or elements > CHUNK_ELEMENTS:
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


def _weighted_moments(Xt: torch.Tensor, wt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of the rows of ``Xt`` under weights ``wt`` (summing to 1), float64.

    Two passes (mean, then centred products) so a large mean does not swamp the covariance.
    """
    step = chunk_rows(Xt.shape[1])
    mean = torch.zeros(Xt.shape[1], dtype=torch.float64, device=Xt.device)
    for a in range(0, len(Xt), step):
        mean += (wt[a : a + step].float() @ Xt[a : a + step]).double()
    mean32, root_w = mean.float(), wt.sqrt().float()
    cov = torch.zeros(Xt.shape[1], Xt.shape[1], dtype=torch.float64, device=Xt.device)
    for a in range(0, len(Xt), step):
        scaled = (Xt[a : a + step] - mean32).mul_(root_w[a : a + step, None])
        cov += (scaled.T @ scaled).double()
    return mean, cov


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


class ReferenceAdamProbe(_BinaryProbe):
    """The reference probe solver, kept for comparison: ``Linear(d, 1)`` trained with Adam
    (lr 1e-3, coupled weight decay 1e-4), BCE-with-logits, 20 epochs, batch 4096, all rows.

    A seed sets the initialisation (``nn.Linear``'s default uniform ±1/sqrt(d)) and the batch
    order, through one ``torch.Generator``; global RNG state is untouched. Batches are slices
    of a per-epoch random permutation, the sampling ``DataLoader(shuffle=True)`` performs.
    """

    def __init__(
        self,
        seed: int = 42,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        epochs: int = 20,
        batch_size: int = 4096,
        device: str = "cpu",
    ) -> None:
        self.seed, self.lr, self.l2 = seed, lr, weight_decay
        self.epochs, self.batch_size, self.device = epochs, batch_size, device

    def fit(
        self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None
    ) -> ReferenceAdamProbe:
        """Fit on all rows; ``groups`` is accepted for interchangeability with ``LinearProbe``
        and unused (the reference's seeds vary initialisation and order, not data)."""
        n, d = _shape(X)
        dev = torch.device(self.device)
        yt = torch.as_tensor(_binary_labels(y, n), dtype=torch.float32, device=dev)
        Xt = to_tensor(X, device=dev)
        gen = torch.Generator().manual_seed(self.seed)
        bound = 1.0 / math.sqrt(d)
        w = ((torch.rand(d, generator=gen) * 2 - 1) * bound).to(dev).requires_grad_(True)
        b = ((torch.rand(1, generator=gen) * 2 - 1) * bound).to(dev).requires_grad_(True)
        opt = torch.optim.Adam([w, b], lr=self.lr, weight_decay=self.l2)
        for _ in range(self.epochs):
            perm = torch.randperm(n, generator=gen).to(dev)
            for a in range(0, n, self.batch_size):
                idx = perm[a : a + self.batch_size]
                loss = F.binary_cross_entropy_with_logits(Xt[idx] @ w + b, yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        self.coef_ = w.detach().double().cpu().numpy()
        self.intercept_ = float(b.detach())
        return self


class RandomHead(_LinearScorer):
    """A uniformly random unit direction (no bias): the null probe behind the detection floor.

    The direction depends only on ``seed`` and the width ``d``; it is drawn on first use.
    """

    def __init__(self, seed: int = 0, device: str = "cpu") -> None:
        self.seed, self.device = seed, device

    def fit(
        self, X: np.ndarray, y: np.ndarray | None = None, groups: np.ndarray | None = None
    ) -> RandomHead:
        """Draw the direction for ``X``'s width; the data are not looked at."""
        _, d = _shape(X)
        v = np.random.default_rng(self.seed).standard_normal(d)
        self.coef_, self.intercept_ = v / np.linalg.norm(v), 0.0
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        if not hasattr(self, "coef_") or len(self.coef_) != _shape(X)[1]:
            self.fit(X)
        return super().decision_function(X)


def random_head_scores(X: np.ndarray, n: int) -> np.ndarray:
    """Scores ``(len(X), n)`` of the random heads with seeds ``0 .. n-1``, in one product."""
    return linear_scores([RandomHead(seed=s).fit(X) for s in range(n)], X)


class LossMLP:
    """Predicts per-token loss from (last-layer) activations: MLP d→hidden→1, ReLU, MSE.

    The output-controlled residual adds its prediction as a covariate: what a probe still
    explains beyond it is signal an output-side predictor cannot see. Inputs and target are
    standardised (train-row statistics); Adam with coupled weight decay as in the reference;
    training stops when the loss on a held-out ``val_fraction`` of rows has not improved for
    ``patience`` epochs, and the best epoch's weights are kept. A seed sets the split, the
    initialisation and the batch order.
    """

    def __init__(
        self,
        hidden: int = 64,
        epochs: int = 50,
        seed: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        batch_size: int = 1024,
        val_fraction: float = 0.1,
        patience: int = 3,
        device: str = "cpu",
    ) -> None:
        if not 0 < val_fraction < 1:
            raise NnobsError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.hidden, self.epochs, self.seed, self.lr = hidden, epochs, seed, lr
        self.weight_decay, self.batch_size = weight_decay, batch_size
        self.val_fraction, self.patience, self.device = val_fraction, patience, device

    def fit(self, X: np.ndarray, loss: np.ndarray) -> LossMLP:
        n, d = _shape(X)
        target = as_vector("loss", loss, n)
        n_val = int(round(self.val_fraction * n))
        if n_val < 1 or n - n_val < 2:
            raise NnobsError(f"LossMLP needs more rows to hold out a validation part, got {n}")
        dev = torch.device(self.device)
        gen = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(n, generator=gen).numpy()
        val_rows, train_rows = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        Xtr, Xva = to_tensor(X, train_rows, dev), to_tensor(X, val_rows, dev)
        uniform = torch.full((len(Xtr),), 1.0 / len(Xtr), dtype=torch.float64, device=dev)
        mean, cov = _weighted_moments(Xtr, uniform)
        self._x_mean = mean.float()
        std = torch.diagonal(cov).sqrt()
        # a constant column carries nothing; scale 1 keeps it from blowing up elsewhere
        self._x_std = torch.where(std > 1e-8 * std.max(), std, torch.ones_like(std)).float()
        self._y_mean = float(target[train_rows].mean())
        self._y_std = float(target[train_rows].std() or 1.0)
        standard = torch.as_tensor((target - self._y_mean) / self._y_std, dtype=torch.float32)
        ytr, yva = standard[train_rows].to(dev), standard[val_rows].to(dev)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.net_ = torch.nn.Sequential(
                torch.nn.Linear(d, self.hidden), torch.nn.ReLU(), torch.nn.Linear(self.hidden, 1)
            ).to(dev)
        opt = torch.optim.Adam(self.net_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        best, best_state, stale = math.inf, None, 0
        self.n_epochs_ = 0
        for _ in range(self.epochs):
            self.net_.train()
            order = torch.randperm(len(train_rows), generator=gen).to(dev)
            for a in range(0, len(order), self.batch_size):
                idx = order[a : a + self.batch_size]
                pred = self._forward(Xtr[idx])
                step_loss = F.mse_loss(pred, ytr[idx])
                opt.zero_grad(set_to_none=True)
                step_loss.backward()
                opt.step()
            self.n_epochs_ += 1
            val = float(F.mse_loss(self._predict_tensor(Xva), yva))
            if val < best:
                best, stale = val, 0
                best_state = {k: t.detach().clone() for k, t in self.net_.state_dict().items()}
            else:
                stale += 1
                if stale >= self.patience:
                    break
        self.net_.load_state_dict(best_state)
        self.val_mse_ = best * self._y_std**2
        return self

    def _forward(self, xb: torch.Tensor) -> torch.Tensor:
        return self.net_((xb - self._x_mean) / self._x_std).squeeze(-1)

    def _predict_tensor(self, Xt: torch.Tensor) -> torch.Tensor:
        self.net_.eval()
        step = chunk_rows(Xt.shape[1])
        with torch.no_grad():
            return torch.cat([self._forward(Xt[a : a + step]) for a in range(0, len(Xt), step)])

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted loss per row (in loss units), float64; reads ``X`` in row chunks."""
        if not hasattr(self, "net_"):
            raise NnobsError("LossMLP is not fitted; call fit() first")
        _check_width(X, self.net_[0].in_features)
        out = np.empty(X.shape[0])
        self.net_.eval()
        for a, b, block in _row_blocks(X):
            with torch.no_grad():
                out[a:b] = self._forward(block.to(self.device)).double().cpu().numpy()
        return out * self._y_std + self._y_mean


class NonlinearControl:
    """A flexible regression of loss on a few covariates (max softmax, norm): the
    ``nonlinear`` control set, which removes any monotone or non-monotone dependence of loss on
    confidence that a linear control would leave in.

    Gradient-boosted trees (histogram-based): fast on millions of rows, insensitive to the
    covariates' scales, and early-stopped on a held-out 10%.
    """

    def __init__(self, seed: int = 0, max_iter: int = 200) -> None:
        self.seed, self.max_iter = seed, max_iter

    def fit(self, covariates: np.ndarray, loss: np.ndarray) -> NonlinearControl:
        loss = as_vector("loss", loss)
        c = as_covariates(covariates, len(loss))
        self.model_ = HistGradientBoostingRegressor(
            max_iter=self.max_iter, early_stopping=True, random_state=self.seed
        ).fit(c, loss)
        return self

    def predict(self, covariates: np.ndarray) -> np.ndarray:
        if not hasattr(self, "model_"):
            raise NnobsError("NonlinearControl is not fitted; call fit() first")
        c = as_covariates(covariates, k=self.model_.n_features_in_, fitting=False)
        return self.model_.predict(c)
