"""Statistics of the decision-quality signal: rank partial correlation, loss residuals,
bootstrap intervals, seed agreement, the detection floor and flagging.

Pure numerics on arrays, float64 throughout; nothing here knows about models. Bad input
(length mismatch, NaN/inf, constant variables, too few rows) raises ``NnobsError``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from nnobs.core.errors import NnobsError

# A residual whose norm is below this fraction of the centred input's norm is treated as zero:
# the variable is (numerically) a function of the covariates.
_DEGENERATE_RTOL = 1e-10


def check_finite(name: str, a: np.ndarray) -> None:
    """Raise ``NnobsError`` naming ``name`` if ``a`` holds NaN or infinite values."""
    a = np.asarray(a)
    if a.dtype.kind not in "fc":
        return
    finite = np.isfinite(a)
    if finite.all():
        return
    n_nan = int(np.isnan(a).sum())
    if n_nan:
        raise NnobsError(f"{name} contains {n_nan} NaN values; drop or impute those rows first")
    n_inf = int((~finite).sum())
    raise NnobsError(f"{name} contains {n_inf} infinite values; drop or clip those rows first")


def as_vector(name: str, a: np.ndarray, n: int | None = None) -> np.ndarray:
    """``a`` as a finite float64 vector, of length ``n`` when given."""
    v = np.asarray(a, dtype=np.float64)
    if v.ndim == 2 and 1 in v.shape:
        v = v.reshape(-1)
    if v.ndim != 1:
        raise NnobsError(f"{name} must be one value per row (1-D), got shape {v.shape}")
    if n is not None and len(v) != n:
        raise NnobsError(f"{name} has {len(v)} rows but x has {n}; pass arrays of equal length")
    check_finite(name, v)
    return v


def as_covariates(
    covariates: np.ndarray, n: int | None = None, k: int | None = None, fitting: bool = True
) -> np.ndarray:
    """Covariates as a finite float64 ``(n, k)`` matrix.

    When ``fitting`` (a regression or correlation is about to use them) a constant column is
    an error: it controls for nothing and makes the design singular.
    """
    c = np.asarray(covariates, dtype=np.float64)
    if c.ndim == 1:
        c = c[:, None]
    if c.ndim != 2:
        raise NnobsError(f"covariates must have shape (n,) or (n, k), got {c.shape}")
    if n is not None and c.shape[0] != n:
        raise NnobsError(
            f"covariates have {c.shape[0]} rows but x has {n}; pass arrays of equal length"
        )
    if k is not None and c.shape[1] != k:
        raise NnobsError(f"covariates must have {k} columns as in fit(), got {c.shape[1]}")
    check_finite("covariates", c)
    if fitting:
        for j in range(c.shape[1]):
            if c.shape[0] and np.all(c[:, j] == c[0, j]):
                raise NnobsError(
                    f"covariate column {j} is constant ({c[0, j]:g}); drop it, "
                    "it controls for nothing"
                )
    return c


def rank(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), as float64, along axis 0.

    The same values as ``scipy.stats.rankdata(x, axis=0)``; an unstable sort is enough for
    average ranks (order within a tie does not change its mean), and about twice as fast.
    """
    x = np.asarray(x)
    if x.ndim == 1:
        return _rank_column(x)
    return np.column_stack([_rank_column(x[:, j]) for j in range(x.shape[1])])


def _rank_column(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v)
    ordered = v[order]
    out = np.empty(len(v))
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    if len(starts) == len(v):  # no ties: the common case for continuous scores
        out[order] = np.arange(1, len(v) + 1)
        return out
    stops = np.r_[starts[1:], len(v)]
    # a tie over sorted positions [start, stop) holds ranks start+1 .. stop: their mean
    out[order] = np.repeat((starts + 1 + stops) / 2, stops - starts)
    return out


def _check_not_constant(name: str, ranks: np.ndarray) -> None:
    for j in np.flatnonzero(np.ptp(ranks, axis=0) == 0):
        col = name if ranks.ndim == 1 else f"{name} column {j}"
        raise NnobsError(f"{col} is constant; a correlation with it is undefined")


def _residualizer(covariates: np.ndarray | None, n: int) -> Callable[[np.ndarray], np.ndarray]:
    """Projection off ``[rank(covariates), 1]``: the residual of least squares on that basis.

    Built once from a QR factorisation (no normal equations, no inverse) so many score
    columns share it.
    """
    if covariates is None:
        _check_rows(n, 0)
        return lambda r: r - r.mean(axis=0)
    c = as_covariates(covariates, n)
    _check_rows(n, c.shape[1])
    design = np.column_stack([rank(c), np.ones(n)])
    q, r_fac = np.linalg.qr(design)
    diag = np.abs(np.diag(r_fac))
    if diag.min() <= 1e-10 * diag.max():
        raise NnobsError(
            "covariates are collinear after ranking (e.g. one is a monotone function of another); "
            "drop the redundant column"
        )
    return lambda r: r - q @ (q.T @ r)


def _check_rows(n: int, k: int) -> None:
    if n < k + 3:
        raise NnobsError(
            f"partial correlation with {k} covariates needs at least {k + 3} rows, got {n}"
        )


class PartialSpearman:
    """Partial Spearman correlation with a fixed ``y`` and covariates, for many scores.

    Every variable is ranked; the ranks of each score and of ``y`` are regressed on
    ``[ranks of covariates, 1]`` by least squares, and the result is the Pearson correlation of
    the residuals. ``y``'s ranks, its residual and the projection are computed once here, so
    scoring another probe costs one ranking. ``covariates`` is (n,), (n, k) or None (plain
    Spearman).
    """

    def __init__(self, y: np.ndarray, covariates: np.ndarray | None = None) -> None:
        y = as_vector("y", y)
        self.n = len(y)
        self._project = _residualizer(covariates, self.n)
        ry = rank(y)
        _check_not_constant("y", ry)
        self._ey = self._project(ry)
        self._norm_y = float(np.linalg.norm(self._ey))
        if self._norm_y <= _DEGENERATE_RTOL * np.linalg.norm(ry - ry.mean()):
            raise NnobsError(
                "y is fully explained by the covariates; its partial correlation is undefined"
            )

    def __call__(self, X: np.ndarray) -> np.ndarray:
        """One value per column of ``X`` (n, m), as an array of length m."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim == 1:
            X = X[:, None]
        if X.ndim != 2:
            raise NnobsError(f"scores must have shape (n,) or (n, m), got {X.shape}")
        if X.shape[0] != self.n:
            raise NnobsError(f"x has {X.shape[0]} values, expected {self.n} (one per row)")
        check_finite("x", X)
        rx = rank(X)
        _check_not_constant("x", rx if X.shape[1] > 1 else rx[:, 0])
        ex = self._project(rx)
        norm_x = np.linalg.norm(ex, axis=0)
        scale_x = np.linalg.norm(rx - rx.mean(axis=0), axis=0)
        bad = np.flatnonzero(norm_x <= _DEGENERATE_RTOL * scale_x)
        if bad.size:
            raise NnobsError(
                f"x column {bad[0]} is fully explained by the covariates (e.g. a score equal to "
                "a covariate); its partial correlation is undefined, leave it out"
            )
        return (ex.T @ self._ey) / (norm_x * self._norm_y)


def partial_spearman_many(
    X: np.ndarray, y: np.ndarray, covariates: np.ndarray | None = None
) -> np.ndarray:
    """Partial Spearman correlation of each column of ``X`` (n, m) with ``y``: see
    :class:`PartialSpearman`."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim in (1, 2):
        check_finite("x", X)
        y = as_vector("y", y, X.shape[0])  # named against x's length, as the caller wrote them
    return PartialSpearman(y, covariates)(X)


def partial_spearman(x: np.ndarray, y: np.ndarray, covariates: np.ndarray | None = None) -> float:
    """Partial Spearman correlation of ``x`` and ``y`` controlling for ``covariates``.

    See ``partial_spearman_many``; with ``covariates=None`` this is plain Spearman.
    """
    x = as_vector("x", x)
    return float(partial_spearman_many(x[:, None], y, covariates)[0])


def rank_residual(y: np.ndarray, covariates: np.ndarray) -> np.ndarray:
    """The part of ``y``'s ranks that the covariates' ranks do not explain linearly: the
    residual :func:`partial_spearman` correlates (one value per row)."""
    y = as_vector("y", y)
    return _residualizer(covariates, len(y))(rank(y))


class LossResidualizer:
    """OLS ``loss ~ covariates + 1`` fitted on the training split.

    Its residual is the part of the loss that the covariates (max softmax, norm) do not
    explain; ``residual > 0`` ("worse than confidence predicts") is the probe's label.
    """

    coef_: np.ndarray
    intercept_: float
    r2_: float

    def fit(self, covariates: np.ndarray, loss: np.ndarray) -> LossResidualizer:
        loss = as_vector("loss", loss)
        c = as_covariates(covariates, len(loss))
        if len(loss) < c.shape[1] + 2:
            raise NnobsError(
                f"fitting {c.shape[1]} covariates needs at least {c.shape[1] + 2} rows, "
                f"got {len(loss)}"
            )
        design = np.column_stack([c, np.ones(len(loss))])
        beta, *_ = np.linalg.lstsq(design, loss, rcond=None)
        self.coef_, self.intercept_ = beta[:-1], float(beta[-1])
        resid = loss - design @ beta
        total = float(np.sum((loss - loss.mean()) ** 2))
        self.r2_ = 1.0 - float(resid @ resid) / total if total > 0 else 0.0
        return self

    def predict(self, covariates: np.ndarray) -> np.ndarray:
        if not hasattr(self, "coef_"):
            raise NnobsError("LossResidualizer is not fitted; call fit() on the training split")
        c = as_covariates(covariates, k=len(self.coef_), fitting=False)
        return c @ self.coef_ + self.intercept_

    def residual(self, covariates: np.ndarray, loss: np.ndarray) -> np.ndarray:
        loss = as_vector("loss", loss)
        pred = self.predict(covariates)
        if len(pred) != len(loss):
            raise NnobsError(f"covariates have {len(pred)} rows but loss has {len(loss)}")
        return loss - pred


def bootstrap_sampler(n: int, groups: np.ndarray | None = None) -> Callable[..., np.ndarray]:
    """A function ``rng -> row indices`` drawing one bootstrap resample of ``n`` rows.

    With ``groups`` (e.g. document ids) whole groups are drawn with replacement (cluster
    bootstrap): tokens of one document are not independent, and resampling them one by one
    understates the variance.
    """
    if n < 1:
        raise NnobsError("cannot resample zero rows")
    if groups is None:
        return lambda rng: rng.integers(0, n, n)
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise NnobsError(f"groups must have one id per row ({n}), got shape {groups.shape}")
    order = np.argsort(groups, kind="stable")
    _, starts, counts = np.unique(groups[order], return_index=True, return_counts=True)

    def draw(rng: np.random.Generator) -> np.ndarray:
        picks = rng.integers(0, len(starts), len(starts))
        lengths = counts[picks]
        first = np.cumsum(lengths) - lengths
        return order[np.arange(lengths.sum()) + np.repeat(starts[picks] - first, lengths)]

    return draw


def bootstrap_ci(
    statistic: Callable[..., float],
    *arrays: np.ndarray,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(*arrays)``.

    Rows are resampled jointly across ``arrays``; with ``groups`` whole groups are resampled.
    """
    if not arrays:
        raise NnobsError("bootstrap_ci needs at least one array to resample")
    if not 0 < confidence < 1:
        raise NnobsError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 2:
        raise NnobsError(f"n_boot must be at least 2, got {n_boot}")
    arrays = tuple(np.asarray(a) for a in arrays)
    n = len(arrays[0])
    for i, a in enumerate(arrays):
        if len(a) != n:
            raise NnobsError(f"array {i} has {len(a)} rows but array 0 has {n}; equal lengths")
    draw = bootstrap_sampler(n, groups)
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    for b in range(n_boot):
        idx = draw(rng)
        values[b] = statistic(*(a[idx] for a in arrays))
    alpha = (1 - confidence) / 2
    lo, hi = np.percentile(values, [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)


def partial_spearman_replicates(
    x: np.ndarray,
    y: np.ndarray,
    covariates: np.ndarray | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """Bootstrap replicates of :func:`partial_spearman`, fast enough for every layer.

    Every variable is ranked once on the full sample; each resample is then a weighted
    least-squares fit of the rank rows, computed for blocks of resamples at once.
    Within-resample ranks are a monotone, near-linear function of the full-sample ranks when n
    is large, so this matches re-ranking each resample to well under the interval's own
    Monte-Carlo error (checked in the tests) at a fraction of the cost.
    ``groups`` resamples whole groups (documents), as :func:`bootstrap_ci` does.

    A resample in which the statistic is undefined (a covariate or variable constant over the
    documents drawn, e.g. a nearly constant loss prediction on few documents) gives NaN
    instead of failing the run; callers count them.
    """
    x = as_vector("x", x)
    n = len(x)
    y = as_vector("y", y, n)
    if n_boot < 2:
        raise NnobsError(f"n_boot must be at least 2, got {n_boot}")
    partial_spearman(x, y, covariates)  # validates the inputs once, with clear errors
    cov = np.zeros((n, 0)) if covariates is None else rank(as_covariates(covariates, n))
    table = np.column_stack([rank(x), rank(y), cov, np.ones(n)])
    # Each resample is a weight per row (how often it was drawn); its least-squares partial
    # correlation follows from the weighted Gram matrix, so a block of resamples is one
    # matrix product. Drawing G groups with replacement = multinomial counts per group.
    if groups is None:
        group_of, n_groups = np.arange(n), n
    else:
        _, group_of = np.unique(np.asarray(groups), return_inverse=True)
        n_groups = int(group_of.max()) + 1
    p = table.shape[1]
    products = (table[:, :, None] * table[:, None, :]).reshape(n, p * p)
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    block = max(1, min(n_boot, 2_000_000 // max(n, 1)))
    for start in range(0, n_boot, block):
        size = min(block, n_boot - start)
        counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=size)
        gram = (counts[:, group_of].astype(np.float64) @ products).reshape(size, p, p)
        values[start : start + size] = _gram_partial_correlation(gram)
    return values


def _gram_partial_correlation(gram: np.ndarray) -> np.ndarray:
    """Partial correlation of columns 0 and 1 given the rest, from a stack of Gram matrices;
    NaN where the covariates' block is singular or a residual vanishes."""
    xy, cc, xc = gram[:, :2, :2], gram[:, 2:, 2:], gram[:, :2, 2:]
    # A singular covariate block (a covariate constant over the rows drawn) is degenerate:
    # solve against the identity there and discard the value.
    scale = np.abs(np.diagonal(cc, axis1=1, axis2=2)).max(axis=1, keepdims=True)
    singular = np.linalg.cond(cc / np.maximum(scale, 1e-300)[:, :, None]) > 1e12
    cc = np.where(singular[:, None, None], np.eye(cc.shape[1]), cc)
    schur = xy - xc @ np.linalg.solve(cc, np.swapaxes(xc, 1, 2))
    variance = schur[:, 0, 0] * schur[:, 1, 1]
    tiny = _DEGENERATE_RTOL * np.diagonal(xy, axis1=1, axis2=2).prod(axis=1)
    bad = singular | (variance <= tiny) | (schur[:, 0, 0] <= 0) | (schur[:, 1, 1] <= 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = schur[:, 0, 1] / np.sqrt(np.where(bad, 1.0, variance))
    return np.where(bad, np.nan, values)


def percentile_interval(
    replicates: np.ndarray, confidence: float = 0.95, *, min_valid: float = 0.5
) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates, ignoring NaN (degenerate resamples);
    refuses when fewer than ``min_valid`` of them are usable."""
    if not 0 < confidence < 1:
        raise NnobsError(f"confidence must be in (0, 1), got {confidence}")
    finite = np.asarray(replicates, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if len(finite) < max(2, min_valid * len(replicates)):
        raise NnobsError(
            f"only {len(finite)} of {len(replicates)} bootstrap resamples had a defined "
            "statistic (too few documents, or a variable constant within most of them); "
            "measure more documents"
        )
    alpha = (1 - confidence) / 2
    lo, hi = np.percentile(finite, [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)


def partial_spearman_ci(
    x: np.ndarray,
    y: np.ndarray,
    covariates: np.ndarray | None = None,
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`partial_spearman`
    (:func:`partial_spearman_replicates`; degenerate resamples are left out)."""
    if not 0 < confidence < 1:
        raise NnobsError(f"confidence must be in (0, 1), got {confidence}")
    values = partial_spearman_replicates(x, y, covariates, n_boot=n_boot, seed=seed, groups=groups)
    return percentile_interval(values, confidence)


def seed_agreement(scores: Sequence[np.ndarray]) -> float:
    """Mean pairwise Spearman correlation between seeds' score vectors on the same rows."""
    if len(scores) < 2:
        raise NnobsError(f"seed agreement needs at least 2 seeds' scores, got {len(scores)}")
    n = len(scores[0])
    ranks = rank(np.column_stack([as_vector(f"scores[{i}]", s, n) for i, s in enumerate(scores)]))
    _check_not_constant("scores", ranks)
    corr = np.corrcoef(ranks, rowvar=False)
    return float(corr[np.triu_indices(len(scores), k=1)].mean())


def detection_floor(null_values: np.ndarray, quantile: float = 0.95) -> dict:
    """Summarise pcorrs measured where no signal can exist (random heads, random-init models).

    The floor is the upper ``quantile`` of those values: a pcorr below it is indistinguishable
    from noise.
    """
    v = as_vector("null_values", null_values)
    if len(v) < 2:
        raise NnobsError(f"a detection floor needs at least 2 null values, got {len(v)}")
    if not 0 < quantile < 1:
        raise NnobsError(f"quantile must be in (0, 1), got {quantile}")
    return {
        "n": len(v),
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)),
        "quantile": quantile,
        "floor": float(np.quantile(v, quantile)),
    }


def flag_catches(
    probe_score: np.ndarray,
    max_softmax: np.ndarray,
    loss: np.ndarray,
    rates: Sequence[float] = (0.05, 0.10, 0.20, 0.30),
) -> list[dict]:
    """Compare flagging by probe score with flagging by low confidence, at each flag rate.

    At rate r the top ``int(r·n)`` tokens by probe score and the ``int(r·n)`` lowest by max
    softmax are flagged (ties broken by row order); a token is high-loss if its loss is above
    the median. ``probe_exclusive`` counts high-loss tokens only the probe flags,
    ``confidence_exclusive`` the reverse, ``overlap`` those both flag.
    """
    score = as_vector("probe_score", probe_score)
    n = len(score)
    conf = as_vector("max_softmax", max_softmax, n)
    loss = as_vector("loss", loss, n)
    if n < 2:
        raise NnobsError(f"flagging needs at least 2 tokens, got {n}")
    high = loss > np.median(loss)
    by_probe = np.argsort(-score, kind="stable")
    by_conf = np.argsort(conf, kind="stable")
    out = []
    for rate in rates:
        if not 0 < rate < 1:
            raise NnobsError(f"flag rates must be in (0, 1), got {rate}")
        k = max(1, int(rate * n))
        probe_flag = np.zeros(n, bool)
        probe_flag[by_probe[:k]] = True
        conf_flag = np.zeros(n, bool)
        conf_flag[by_conf[:k]] = True
        out.append(
            {
                "rate": float(rate),
                "n_tokens": n,
                "n_high_loss": int(high.sum()),
                "n_flagged": k,
                "probe_precision": float(high[probe_flag].mean()),
                "confidence_precision": float(high[conf_flag].mean()),
                "probe_exclusive": int((high & probe_flag & ~conf_flag).sum()),
                "confidence_exclusive": int((high & conf_flag & ~probe_flag).sum()),
                "overlap": int((high & probe_flag & conf_flag).sum()),
            }
        )
    return out
