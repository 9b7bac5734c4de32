"""The protocol's statistic: the probe's label, its probes, and the controlled pcorr of scores.

- *label*: the OLS residual of loss on ``max_softmax + norm + 1`` (fit on the probe's training
  tokens, per layer since ``norm`` is that layer's activation norm) is positive: the token is
  worse than confidence predicts.
- *pcorr*: partial Spearman correlation between a probe's score and loss, controlling for max
  softmax and the layer's activation norm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from nnobs.measure import stats
from nnobs.measure.probes import LinearProbe, fit_resampled
from nnobs.observe.settings import ObserveSettings
from nnobs.observe.splits import SplitData


def pcorr(score: np.ndarray, data: SplitData, site: str, *extra: np.ndarray) -> Any:
    """Controlled pcorr of a score (a float), or of each column of a score matrix (a list)."""
    if extra:
        values = stats.PartialSpearman(data.cap.loss, data.covariates(site, *extra))(score)
    else:
        values = data.controlled(site)(score)
    return float(values[0]) if np.ndim(score) == 1 else [float(v) for v in values]


def residual_labels(train: SplitData, site: str) -> np.ndarray:
    """``loss`` residualised on (max softmax, norm) is positive: worse than confidence predicts."""
    cov = train.covariates(site)
    return stats.LossResidualizer().fit(cov, train.cap.loss).residual(cov, train.cap.loss) > 0


def fit_probe(train: SplitData, site: str, seed: int, resample: bool, device: str) -> LinearProbe:
    """One probe of the label at ``site`` (``resample``: on a bootstrap resample of documents)."""
    probe = LinearProbe(seed=seed, resample=resample, device=device)
    return probe.fit(train.acts(site), residual_labels(train, site), groups=train.cap.doc_ids)


def fit_seed_probes(
    train: SplitData, site: str, seeds: Sequence[int], device: str
) -> list[LinearProbe]:
    """One probe per seed, each fit to a bootstrap resample of the training documents."""
    labels = residual_labels(train, site)
    return fit_resampled(train.acts(site), labels, seeds, groups=train.cap.doc_ids, device=device)


def candidate_layers(sweep: list[dict], n_layers: int, settings: ObserveSettings) -> list[int]:
    """Top layers by sweep pcorr, excluding the last (1 - max_depth_fraction) of depth."""
    allowed = [r for r in sweep if r["layer"] + 1 <= settings.max_depth_fraction * n_layers]
    if not allowed:  # a very shallow model: keep the shallowest layer
        allowed = [min(sweep, key=lambda r: r["layer"])]
    ranked = sorted(allowed, key=lambda r: r["pcorr"], reverse=True)
    return [r["layer"] for r in ranked[: settings.n_candidates]]


def _nonzero(scale: np.ndarray) -> np.ndarray:
    return np.where(scale > 0, scale, 1.0)


def seed_summary(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation of per-seed values."""
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1))}


def ensemble_score(scores: np.ndarray) -> np.ndarray:
    """Mean of the seeds' standardised scores (columns): the protocol's single score per token."""
    return ((scores - scores.mean(axis=0)) / _nonzero(scores.std(axis=0))).mean(axis=1)


def ci(score: np.ndarray, data: SplitData, covariates: np.ndarray, n_boot: int) -> list[float]:
    """95% cluster-bootstrap interval (documents resampled) of a controlled pcorr."""
    lo, hi = stats.partial_spearman_ci(
        score, data.cap.loss, covariates, n_boot=n_boot, groups=data.cap.doc_ids
    )
    return [lo, hi]


def hand_statistics(X: np.ndarray) -> dict[str, np.ndarray]:
    """Hand-designed activation statistics per token (the protocol's baselines)."""
    out = {"mean_square": [], "active_ratio": [], "activation_entropy": [], "norm": []}
    for a in range(0, len(X), 8192):
        h = np.asarray(X[a : a + 8192], dtype=np.float32)
        sq = h * h
        total = sq.sum(1, keepdims=True) + 1e-12
        p = sq / total
        out["mean_square"].append(sq.mean(1))
        out["active_ratio"].append((h > 0).mean(1))
        out["activation_entropy"].append(-(p * np.log(p + 1e-12)).sum(1))
        out["norm"].append(np.sqrt(total[:, 0]))
    return {k: np.concatenate(v).astype(np.float64) for k, v in out.items()}
