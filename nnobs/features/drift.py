"""How features drift between a model and its fine-tuned descendant, on the same tokens.

- **Neurons** (an ``mlp_hidden`` site): each neuron of the base model is matched to one of
  the fine-tuned model's by the correlation of their activations over the same tokens, one to
  one (the Hungarian algorithm on −correlation). A neuron keeps its role when its match is its
  own index with a high correlation.
- **SAE features**: the two models' dictionaries are matched one to one by decoder cosine
  (Hungarian; the fraction matched at cosine >= 0.7). A base feature *vanished* when its best
  match in the fine-tuned SAE is below what two SAEs of the base model from different seeds
  give (the 5% quantile of their best matches); a fine-tuned feature *appeared* likewise
  (:func:`vanish_test`).
- **SAE transfer**: the base model's SAE spliced into the fine-tuned model, against the
  fine-tuned model's own SAE: variance explained (the first positions of each window left out,
  whose norms are outliers) and the loss with each reconstruction spliced in.
- **CKA** of every layer's residual stream before vs after.
- **The decision-quality signal** before and after: the protocol on both, on the same tokens,
  and a paired test of its change (:mod:`nnobs.features.signal_change`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from nnobs.core.errors import NnobsError
from nnobs.data.corpus import Corpus
from nnobs.data.windows import Windows
from nnobs.features.sae import SparseAutoencoder
from nnobs.features.sae_eval import evaluate_sae
from nnobs.features.signal_change import KEPT_MARGIN, HeadlineInputs, paired_change
from nnobs.features.stream import site_batches
from nnobs.measure.cka import linear_cka
from nnobs.measure.probes import linear_scores
from nnobs.models.adapter import ModelAdapter
from nnobs.observe.capture import Capture, capture, capture_scratch
from nnobs.observe.protocol import observe
from nnobs.observe.settings import ObserveSettings
from nnobs.observe.signal import ensemble_score, fit_seed_probes, pcorr
from nnobs.observe.splits import SplitData, model_trained_on

MATCH_THRESHOLD = 0.7
VANISH_LEVEL = 0.05
HISTOGRAM_EDGES = np.linspace(-1.0, 1.0, 41)


def check_same_tokenizer(before: ModelAdapter, after: ModelAdapter) -> None:
    """Refuse two models that read text differently: their activations share no tokens."""
    a, b = (getattr(m.tokenizer, "fingerprint", None) for m in (before, after))
    if a is None or a != b:
        raise NnobsError(
            f"the two models have different tokenizers ({a} vs {b}): drift compares "
            "activations on the same tokens, so both must read text the same way"
        )


def _histogram(values: np.ndarray) -> dict[str, list]:
    counts, _ = np.histogram(np.clip(values, -1, 1), bins=HISTOGRAM_EDGES)
    return {"edges": HISTOGRAM_EDGES.round(3).tolist(), "counts": counts.tolist()}


def hungarian(similarity: np.ndarray, threshold: float = MATCH_THRESHOLD) -> dict[str, Any]:
    """One-to-one matching of rows to columns maximising total similarity; per row its match
    (-1 when there are fewer columns) and similarity, and the summary of the matches."""
    rows, cols = linear_sum_assignment(-similarity)
    match = np.full(similarity.shape[0], -1)
    match[rows] = cols
    matched = np.full(similarity.shape[0], -np.inf)
    matched[rows] = similarity[rows, cols]
    found = np.isfinite(matched)
    return {
        "match": match.tolist(),
        "similarity": np.where(found, matched, np.nan).tolist(),
        "fraction_matched": float((matched >= threshold).mean()),
        "threshold": threshold,
        "median": float(np.median(matched[found])) if found.any() else None,
        "histogram": _histogram(matched[found]),
    }


def activation_correlation(
    before: ModelAdapter, after: ModelAdapter, windows: Windows, site: str, batch_size: int = 16
) -> np.ndarray:
    """(units, units) Pearson correlation between the base model's units (rows) and the
    fine-tuned model's (columns) at ``site`` over the same tokens, accumulated one batch at a
    time; a unit that never varies correlates 0 with everything."""
    sums: dict[str, Any] = {}
    pairs = zip(
        site_batches(before, windows, site, batch_size),
        site_batches(after, windows, site, batch_size),
        strict=True,
    )
    for a, b in pairs:
        x = a.acts[a.valid].double().cpu()
        y = b.acts[b.valid].double().cpu()
        for name, value in (("x", x.sum(0)), ("y", y.sum(0)), ("xx", (x * x).sum(0)),
                            ("yy", (y * y).sum(0)), ("xy", x.T @ y), ("n", len(x))):  # fmt: skip
            sums[name] = sums.get(name, 0) + value
    n = sums["n"]
    mx, my = sums["x"] / n, sums["y"] / n
    cov = sums["xy"] / n - torch.outer(mx, my)
    sx = (sums["xx"] / n - mx**2).clamp_min(0).sqrt()
    sy = (sums["yy"] / n - my**2).clamp_min(0).sqrt()
    scale = torch.outer(sx, sy)
    corr = torch.where(scale > 1e-12, cov / scale.clamp_min(1e-12), 0.0)
    return corr.clamp(-1, 1).numpy()


def neuron_drift(corr: np.ndarray) -> dict[str, Any]:
    """Neurons matched by activation correlation: the Hungarian matching, how many kept their
    own index, and each neuron's correlation with its own index."""
    matching = hungarian(corr)
    own = np.diag(corr)
    return {
        "n_units": int(corr.shape[0]),
        "matching": matching,
        "kept_index": float((np.asarray(matching["match"]) == np.arange(len(corr))).mean()),
        "own_correlation": {"median": float(np.median(own)), "histogram": _histogram(own)},
    }


def decoder_cosines(a: SparseAutoencoder, b: SparseAutoencoder) -> np.ndarray:
    """(a's features, b's features) cosine between their decoder directions."""
    if a.d_in != b.d_in:
        raise NnobsError(f"the SAEs read {a.d_in} and {b.d_in}-wide activations")
    unit = [torch.nn.functional.normalize(s.W_dec.detach().float().cpu(), dim=1) for s in (a, b)]
    return (unit[0] @ unit[1].T).numpy()


def vanish_test(
    cos: np.ndarray, null_cos: np.ndarray | None, level: float = VANISH_LEVEL
) -> dict[str, Any]:
    """Base features (rows of ``cos``) that vanished and fine-tuned ones (columns) that
    appeared, most extreme first.

    A feature's statistic is its best match (largest cosine) in the other dictionary. With
    ``null_cos`` (the base SAE against a second base SAE trained from another seed: the null
    "same model, another SAE seed"), a base feature vanished when its best match is below the
    ``level`` quantile of the null's best matches of base features, and a fine-tuned feature
    appeared when its best match is below that quantile of the second SAE's features' best
    matches in the base SAE; under the null each feature is called with probability about
    ``level``, the rate reported as expected. Without a null, the fixed
    :data:`MATCH_THRESHOLD` is used and no rate can be stated."""
    best = {"vanished": cos.max(axis=1), "appeared": cos.max(axis=0)}
    if null_cos is None:
        limits = dict.fromkeys(best, MATCH_THRESHOLD)
    else:
        null_best = {"vanished": null_cos.max(axis=1), "appeared": null_cos.max(axis=0)}
        limits = {k: float(np.quantile(null_best[k], level)) for k in best}
    called = {k: np.flatnonzero(best[k] < limits[k]) for k in best}
    out: dict[str, Any] = {k: v[np.argsort(best[k][v])].tolist() for k, v in called.items()}
    out["best_match"] = {"base": best["vanished"].tolist(), "tuned": best["appeared"].tolist()}
    out["vanish_test"] = None
    if null_cos is not None:
        out["vanish_test"] = {
            "null": "two SAEs of the base model trained from different seeds",
            "level": level,
            "threshold_vanished": limits["vanished"],
            "threshold_appeared": limits["appeared"],
            "vanished_rate": len(called["vanished"]) / cos.shape[0],
            "appeared_rate": len(called["appeared"]) / cos.shape[1],
            "expected_rate": level,
            "expected_vanished": level * cos.shape[0],
            "expected_appeared": level * cos.shape[1],
        }
    return out


def decoder_matching(
    base: SparseAutoencoder,
    tuned: SparseAutoencoder,
    null: SparseAutoencoder | None = None,
    level: float = VANISH_LEVEL,
) -> dict[str, Any]:
    """Dictionary features matched one to one by decoder cosine (Hungarian), and the features
    that vanished or appeared, tested against ``null``, a second SAE of the base model from
    another seed (:func:`vanish_test`)."""
    cos = decoder_cosines(base, tuned)
    null_cos = decoder_cosines(base, null) if null is not None else None
    return {**hungarian(cos), **vanish_test(cos, null_cos, level)}


def sae_transfer(
    tuned_model: ModelAdapter,
    base_sae: SparseAutoencoder,
    tuned_sae: SparseAutoencoder,
    windows: Windows,
    *,
    skip_positions: int = 1,
    batch_size: int = 16,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Both dictionaries on the fine-tuned model: the base SAE spliced in vs its own."""
    settings = {"skip_positions": skip_positions, "batch_size": batch_size, "n_boot": n_boot}
    return {
        "base_sae": evaluate_sae(tuned_model, base_sae, windows, **settings),
        "own_sae": evaluate_sae(tuned_model, tuned_sae, windows, **settings),
    }


def cka_per_layer(
    before: ModelAdapter, after: ModelAdapter, windows: Windows, batch_size: int = 16
) -> list[dict[str, Any]]:
    """Linear CKA between the two models' residual streams after every block, same tokens."""
    if before.n_layers != after.n_layers:
        raise NnobsError(f"the models have {before.n_layers} and {after.n_layers} layers")
    sites = [before.site_name(layer) for layer in range(before.n_layers)]
    runs = [
        capture(m, windows, sites, batch_size=batch_size, dtype=np.float32, progress=False)
        for m in (before, after)
    ]
    return [
        {"layer": layer, "site": site, "cka": linear_cka(runs[0].acts[site], runs[1].acts[site])}
        for layer, site in enumerate(sites)
    ]


def _signal_summary(result: dict[str, Any]) -> dict[str, Any]:
    headline = result["headline"]
    return {
        "layer": result["layer"],
        "pcorr": headline["ensemble"],
        "ci95": headline["ensemble_ci95"],
        "sweep": [{"layer": r["layer"], "pcorr": r.get("pcorr")} for r in result["sweep"]],
        "statement": (result.get("verdict") or {}).get("statement"),
        "tokens": result["tokens"],
    }


def headline_inputs(
    adapter: ModelAdapter, result: dict[str, Any], work_dir: Path, settings: ObserveSettings
) -> HeadlineInputs:
    """The per-token inputs of an observe result's headline, from the splits it captured into
    ``work_dir``: the chosen layer's seed probes are fit again (deterministically, as the
    protocol fit them) and scored on the test split."""
    train, test = (SplitData(s, Capture.load(work_dir / s)) for s in ("train", "test"))
    site = result["headline"]["site"]
    probes = fit_seed_probes(train, site, settings.seeds, str(adapter.device), settings.label)
    scores = linear_scores(probes, test.acts(site))
    return HeadlineInputs(
        ensemble_score(scores), test.cap.loss, test.covariates(site), test.cap.doc_ids,
        pcorr(scores, test, site),
    )  # fmt: skip


def decision_signal(
    before: ModelAdapter,
    after: ModelAdapter,
    corpus: Corpus,
    settings: ObserveSettings,
    *,
    level: float = 0.05,
    margin: float = KEPT_MARGIN,
) -> dict[str, Any]:
    """The decision-quality protocol on both models over the same documents and tokens, and
    the paired test of its change (:func:`nnobs.features.signal_change.paired_change`).

    The fine-tuned model has seen every document its parent trained on, so when either model
    trained on ``corpus`` both are measured on text held out from that training (the halves of
    the validation split), never one on held-out and the other on training text."""
    held_out = model_trained_on(before, corpus) or model_trained_on(after, corpus)
    mark = {"corpus_fingerprint": corpus.fingerprint if held_out else None, "corpus_spec": None}
    results: dict[str, Any] = {}
    inputs = {}
    with capture_scratch("nnobs-drift-") as scratch:
        for name, model in (("before", before), ("after", after)):
            marked = replace(model, provenance={**model.provenance, **mark})
            result = observe(marked, corpus, settings=settings, work_dir=scratch / name,
                             progress=False)  # fmt: skip
            results[name] = _signal_summary(result)
            inputs[name] = headline_inputs(model, result, scratch / name, settings)
    results["held_out_from_training"] = held_out
    results["change"] = paired_change(
        inputs["before"], inputs["after"], n_boot=settings.n_boot, level=level, margin=margin
    )
    results["difference"] = results["change"]["difference"]
    return results
