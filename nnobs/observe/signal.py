"""The protocol's statistic: the probe's label, its probes, and the controlled pcorr of scores.

- *label*: the token is worse than confidence predicts, i.e. a residual of loss given max
  softmax and the layer's activation norm is positive (fit on the probe's training tokens, per
  layer since ``norm`` is that layer's). ``label="reference"`` (the default, chosen by the
  calibration benchmark) is the reference method's OLS of raw loss on raw
  ``max_softmax + norm + 1``; loss is convex in max softmax, so that fit sits near 0 for
  confident tokens and labels most of them positive. ``label="rank"`` takes the residual of
  loss's rank on the covariates' ranks: the very residual pcorr correlates.
- *pcorr*: partial Spearman correlation between a probe's score and loss, controlling for max
  softmax and the layer's activation norm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from nnobs.measure import stats
from nnobs.measure.probes import LinearProbe, fit_resampled
from nnobs.observe.settings import DEFAULT_LABEL, ObserveSettings
from nnobs.observe.splits import SplitData


def pcorr(score: np.ndarray, data: SplitData, site: str, *extra: np.ndarray) -> Any:
    """Controlled pcorr of a score (a float), or of each column of a score matrix (a list)."""
    if extra:
        values = stats.PartialSpearman(data.cap.loss, data.covariates(site, *extra))(score)
    else:
        values = data.controlled(site)(score)
    return float(values[0]) if np.ndim(score) == 1 else [float(v) for v in values]


def residual_labels(train: SplitData, site: str, label: str = DEFAULT_LABEL) -> np.ndarray:
    """The probe's label: loss residualised on (max softmax, norm) is positive (module
    docstring; ``label`` is ``"rank"`` or ``"reference"``)."""
    cov, loss = train.covariates(site), train.cap.loss
    if label == "rank":
        return stats.rank_residual(loss, cov) > 0
    return stats.LossResidualizer().fit(cov, loss).residual(cov, loss) > 0


def fit_probe(
    train: SplitData, site: str, seed: int, resample: bool, device: str, label: str = DEFAULT_LABEL
) -> LinearProbe:
    """One probe of the label at ``site`` (``resample``: on a bootstrap resample of documents)."""
    probe = LinearProbe(seed=seed, resample=resample, device=device)
    labels = residual_labels(train, site, label)
    return probe.fit(train.acts(site), labels, groups=train.cap.doc_ids)


def fit_seed_probes(
    train: SplitData, site: str, seeds: Sequence[int], device: str, label: str = DEFAULT_LABEL
) -> list[LinearProbe]:
    """One probe per seed, each fit to a bootstrap resample of the training documents."""
    labels = residual_labels(train, site, label)
    return fit_resampled(train.acts(site), labels, seeds, groups=train.cap.doc_ids, device=device)


def label_diagnostic(train: SplitData, site: str) -> dict[str, Any]:
    """Each label's positive rate per max-softmax decile of the training tokens: a label that
    calls most near-certain tokens "worse than predicted" is partly a confidence label."""
    softmax = train.cap.max_softmax
    edges = np.quantile(softmax, np.linspace(0, 1, 11))
    decile = np.clip(np.searchsorted(edges, softmax, side="right") - 1, 0, 9)
    rates = {}
    for label in ("rank", "reference"):
        positive = residual_labels(train, site, label)
        rates[label] = [
            float(positive[decile == d].mean()) if np.any(decile == d) else None for d in range(10)
        ]
    return {"split": "train", "site": site, "max_softmax_edges": edges.tolist(), **rates}


def candidate_layers(sweep: list[dict], n_layers: int, settings: ObserveSettings) -> list[int]:
    """The reference's rule: the top ``n_candidates`` layers by sweep pcorr among layers
    ``l <= int(max_depth_fraction * n_layers)``, plus the sweep's peak layer."""
    limit = int(settings.max_depth_fraction * n_layers)
    allowed = [r for r in sweep if r["layer"] <= limit]
    if not allowed:  # layers were chosen that all sit deeper: keep the shallowest
        allowed = [min(sweep, key=lambda r: r["layer"])]
    ranked = sorted(allowed, key=lambda r: r["pcorr"], reverse=True)
    chosen = [r["layer"] for r in ranked[: settings.n_candidates]]
    peak = max(sweep, key=lambda r: r["pcorr"])["layer"]
    return chosen if peak in chosen else [*chosen, peak]


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


def headline_replicates(
    score: np.ndarray, per_seed: Sequence[float], data: SplitData, site: str, n_boot: int
) -> np.ndarray:
    """Replicates of the ensemble's pcorr that vary both the test documents and the probe's
    training documents.

    Test documents: a cluster bootstrap of the test split. Training documents: each seed's
    probe was fit to a bootstrap resample of the training documents, so the seeds' deviations
    from their mean on the same test tokens sample how the probe moves with its training
    documents (an ensemble of bootstrap probes moves about as much as one probe fit to all of
    them: bagging averages out the resampling, not the training set). Each replicate adds one
    seed's deviation, drawn at random and scaled by sqrt(S / (S - 1)) for the S seeds, to one
    test bootstrap replicate. NaN replicates are resamples where pcorr is undefined.
    """
    test_part = stats.partial_spearman_replicates(
        score, data.cap.loss, data.covariates(site), n_boot=n_boot, groups=data.cap.doc_ids
    )
    deviations = np.asarray(per_seed, dtype=np.float64)
    deviations = (deviations - deviations.mean()) * np.sqrt(len(deviations) / (len(deviations) - 1))
    rng = np.random.default_rng(1)
    return test_part + rng.choice(deviations, size=n_boot)


def hand_statistics(X: np.ndarray) -> dict[str, np.ndarray]:
    """Hand-designed activation statistics per token, as the reference defines them:
    ``active_ratio`` counts units with |h| > 0.01, ``activation_entropy`` is the entropy of
    |h| normalised to sum 1. (``norm`` and ``mean_square`` are functions of the norm covariate
    and are controlled away: see :data:`CONTROLLED_AWAY`.)"""
    out = {"active_ratio": [], "activation_entropy": []}
    for a in range(0, len(X), 8192):
        h = np.abs(np.asarray(X[a : a + 8192], dtype=np.float32))
        p = h / (h.sum(1, keepdims=True) + 1e-12)
        out["active_ratio"].append((h > ACTIVE_THRESHOLD).mean(1))
        out["activation_entropy"].append(-(p * np.log(p + 1e-12)).sum(1))
    return {k: np.concatenate(v).astype(np.float64) for k, v in out.items()}


ACTIVE_THRESHOLD = 0.01
# Baselines that are monotone functions of the norm covariate (mean_square = norm² / d): their
# rank partial correlation given the norm is 0 by construction, so they are not computed (a
# float16 capture would otherwise report rounding noise as a value).
CONTROLLED_AWAY = ("norm", "mean_square")
