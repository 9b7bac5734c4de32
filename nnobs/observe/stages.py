"""The protocol's stages on captured splits, each one part of the result; ``observe`` runs them
all, the trajectory its tracked subset (test evaluation and output control) per checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nnobs.core.errors import NnobsError
from nnobs.data.corpus import Corpus
from nnobs.measure import stats
from nnobs.measure.nulltest import replicate_sd
from nnobs.measure.predictors import LossMLP, NonlinearControl
from nnobs.measure.probes import LinearProbe, linear_scores, random_head_scores
from nnobs.models.adapter import ModelAdapter
from nnobs.observe.settings import ObserveSettings
from nnobs.observe.signal import (
    CONTROLLED_AWAY,
    ci,
    ensemble_score,
    fit_probe,
    fit_seed_probes,
    hand_statistics,
    headline_replicates,
    pcorr,
    seed_summary,
)
from nnobs.observe.splits import SplitData, capture_splits

OUTPUT_PREDICTOR = "MLP d→64→1 (ReLU) on the last layer, fit on probe-train tokens"


def layer_sweep(
    train: SplitData, val: SplitData, sites: dict[int, str], settings: ObserveSettings, device: str
) -> tuple[list[dict[str, Any]], dict[int, LinearProbe]]:
    """The sweep probe (all training tokens) at every layer, scored on the validation split."""
    sweep, probes = [], {}
    for layer, site in sites.items():
        probe = fit_probe(train, site, settings.sweep_seed, False, device, settings.label)
        probes[layer] = probe
        score = probe.decision_function(val.acts(site))
        sweep.append(
            {
                "layer": layer,
                "site": site,
                "pcorr": pcorr(score, val, site),
                "spearman": stats.partial_spearman(score, val.cap.loss),
                "split": "validation",
                "seed": settings.sweep_seed,
                "converged": bool(probe.converged_),
            }
        )
    return sweep, probes


def layer_profile(
    train: SplitData, val: SplitData, sites: dict[int, str], settings: ObserveSettings, device: str
) -> list[dict[str, Any]]:
    """The sweep probe at every layer, scored on the validation split with its
    cluster-bootstrap CI (the trajectory's layer profile).

    A layer where the statistic is undefined (e.g. a collapsed, constant representation)
    gets ``pcorr: null`` and the reason; the other layers are still measured.
    """
    rows = []
    for layer, site in sites.items():
        row: dict[str, Any] = {"layer": layer, "site": site}
        try:
            probe = fit_probe(train, site, settings.sweep_seed, False, device, settings.label)
            score = probe.decision_function(val.acts(site))
            row.update(
                pcorr=pcorr(score, val, site),
                ci95=ci(score, val, val.covariates(site), settings.n_boot),
                spearman=stats.partial_spearman(score, val.cap.loss),
            )
        except NnobsError as err:
            row.update(pcorr=None, ci95=None, spearman=None, note=str(err))
        rows.append(row)
    if all(r["pcorr"] is None for r in rows):
        raise NnobsError(f"no layer could be measured ({rows[0]['note']})")
    return rows


def multiseed_evaluation(
    train: SplitData,
    val: SplitData,
    sites: dict[int, str],
    candidates: list[int],
    settings: ObserveSettings,
    device: str,
) -> tuple[list[dict[str, Any]], dict[int, list[LinearProbe]]]:
    """Every seed's probe at each candidate layer, scored on the validation split."""
    rows, probes = [], {}
    for layer in candidates:
        site = sites[layer]
        probes[layer] = fit_seed_probes(train, site, settings.seeds, device, settings.label)
        scores = linear_scores(probes[layer], val.acts(site))
        values = pcorr(scores, val, site)
        rows.append(
            {
                "layer": layer,
                "site": site,
                "split": "validation",
                "seeds": list(settings.seeds),
                "pcorr": values,
                **seed_summary(values),
                "seed_agreement": stats.seed_agreement(scores.T),
            }
        )
    return rows, probes


def evaluate_on_test(
    probes: list[LinearProbe],
    test: SplitData,
    layer: int,
    site: str,
    settings: ObserveSettings,
    *,
    agreement: bool = False,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """The best layer's seed probes on the test split: pcorr per seed, and of their ensemble
    with a 95% interval over the test documents *and* the probe's training documents
    (:func:`nnobs.observe.signal.headline_replicates`), its standard deviation, and the
    narrower interval over test documents alone (with ``agreement``, seed agreement too).

    Returns the record, the seeds' scores (one column each) and the ensemble score.
    """
    scores = linear_scores(probes, test.acts(site))
    per_seed = pcorr(scores, test, site)
    score = ensemble_score(scores)
    record = {
        "layer": layer,
        "site": site,
        "split": "test",
        "label": settings.label,
        "seeds": list(settings.seeds),
        "per_seed": per_seed,
        **seed_summary(per_seed),
    }
    if agreement:
        record["seed_agreement"] = stats.seed_agreement(scores.T)
    record["ensemble"] = pcorr(score, test, site)
    replicates = headline_replicates(score, per_seed, test, site, settings.n_boot)
    record["ensemble_ci95"] = list(stats.percentile_interval(replicates))
    record["ensemble_sd"] = replicate_sd(replicates)
    record["ensemble_ci95_test_docs"] = ci(score, test, test.covariates(site), settings.n_boot)
    record["undefined_resamples"] = int(np.isnan(replicates).sum())
    record["interval"] = "test documents and the probe's training documents (seed deviations)"
    return record, scores, score


def headline_under_label(
    train: SplitData,
    test: SplitData,
    site: str,
    settings: ObserveSettings,
    label: str,
    device: str,
) -> float:
    """The ensemble's test pcorr at ``site`` with probes trained on another ``label``: the
    headline as a method using that label would report it."""
    probes = fit_seed_probes(train, site, settings.seeds, device, label)
    return pcorr(ensemble_score(linear_scores(probes, test.acts(site))), test, site)


def output_control(
    train: SplitData,
    test: SplitData,
    site: str,
    last_site: str,
    score: np.ndarray,
    n_boot: int,
    device: str,
    seed_scores: np.ndarray | None = None,
) -> dict[str, Any]:
    """The ensemble ``score``'s pcorr with a loss prediction from the last layer (an MLP,
    :data:`OUTPUT_PREDICTOR`) as an extra covariate: the signal the output does not carry.

    With ``seed_scores`` (one column per seed) each seed's value and their mean too; the seeds
    and the ensemble are then scored in one call, so loss and covariates are ranked once.
    """
    predictor = LossMLP(seed=0, device=device).fit(train.acts(last_site), train.cap.loss)
    predicted = predictor.predict(test.acts(last_site))
    loss = test.cap.loss
    with_predicted = test.covariates(site, predicted)
    record: dict[str, Any] = {
        "site": last_site,
        "predictor_r2_test": float(1 - np.mean((loss - predicted) ** 2) / np.var(loss)),
    }
    if seed_scores is None:
        record["ensemble"] = pcorr(score, test, site, predicted)
    else:
        *per_seed, ensemble = pcorr(np.column_stack([seed_scores, score]), test, site, predicted)
        record.update(per_seed=per_seed, ensemble=ensemble)
    record["ensemble_ci95"] = ci(score, test, with_predicted, n_boot)
    if seed_scores is not None:
        record["mean"] = float(np.mean(record["per_seed"]))
    return record


def control_sensitivity(
    score: np.ndarray, train: SplitData, test: SplitData, site: str
) -> dict[str, Any]:
    """pcorr of one score under the six covariate sets; how much a naive probe overstates."""
    softmax, norm, entropy = test.cap.max_softmax, test.cap.norms[site], test.cap.entropy
    nonlinear = NonlinearControl(seed=0).fit(train.covariates(site), train.cap.loss)
    sets = {
        "none": None,
        "softmax_only": softmax,
        "norm_only": norm,
        "standard": np.column_stack([softmax, norm]),
        "plus_entropy": np.column_stack([softmax, norm, entropy]),
        "nonlinear": np.column_stack([softmax, norm, nonlinear.predict(test.covariates(site))]),
    }
    values = {name: stats.partial_spearman(score, test.cap.loss, cov) for name, cov in sets.items()}
    plain = values["none"]
    return {
        "split": "test",
        "pcorr": values,
        "overstatement": (plain - values["standard"]) / plain if plain > 0 else None,
    }


def baseline_statistics(test: SplitData, site: str, settings: ObserveSettings) -> dict[str, Any]:
    """Hand-designed statistics and random heads through the same controlled statistic."""
    out: dict[str, Any] = {
        name: {"pcorr": None, "note": "a function of the norm covariate: controlled away"}
        for name in CONTROLLED_AWAY
    }
    for name, value in hand_statistics(test.acts(site)).items():
        try:
            out[name] = {"pcorr": pcorr(value, test, site)}
        except NnobsError as err:  # e.g. constant over the split
            out[name] = {"pcorr": None, "note": str(err)}
    out["active_ratio"]["definition"] = "share of units with |h| > 0.01"
    out["activation_entropy"]["definition"] = "entropy of |h| normalised to sum 1"
    values = np.asarray(
        pcorr(random_head_scores(test.acts(site), settings.random_heads), test, site)
    )
    out["random_head"] = {
        "n": settings.random_heads,
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)),
        "mean_abs": float(np.abs(values).mean()),
        "values": values.tolist(),
    }
    return out


def cross_domain(
    adapter: ModelAdapter,
    domain2: Corpus,
    site: str,
    probes: list[LinearProbe],
    score_a: np.ndarray,
    test_a: SplitData,
    settings: ObserveSettings,
    work_dir: Path,
    progress: bool,
) -> dict[str, Any]:
    """Probe trained on domain A evaluated on domain B's test split, and within B."""
    docs = {"train": domain2.train, "test": domain2.test}
    data = capture_splits(adapter, docs, [site], settings, work_dir, progress, "domain2-")
    b_train, b_test = data["train"], data["test"]
    transfer = ensemble_score(linear_scores(probes, b_test.acts(site)))
    within = fit_seed_probes(b_train, site, settings.seeds, str(adapter.device))
    return {
        "site": site,
        "domain_a": "corpus",
        "domain_b": domain2.name,
        "split": "test",
        "a_to_a": pcorr(score_a, test_a, site),
        "a_to_b": pcorr(transfer, b_test, site),
        "b_to_b": pcorr(ensemble_score(linear_scores(within, b_test.acts(site))), b_test, site),
        "tokens": {"train": b_train.n, "test": b_test.n},
    }
