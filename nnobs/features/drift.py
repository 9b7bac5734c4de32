"""How features drift between a model and its fine-tuned descendant, on the same tokens.

- **Neurons** (an ``mlp_hidden`` site): each neuron of the base model is matched to one of
  the fine-tuned model's by the correlation of their activations over the same tokens, one to
  one (the Hungarian algorithm on −correlation). A neuron keeps its role when its match is its
  own index with a high correlation.
- **SAE features**: the two models' dictionaries are matched one to one by decoder cosine
  (Hungarian); a base feature whose match is below the threshold (0.7) *vanished*, a
  fine-tuned feature without a match above it *appeared*.
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


def decoder_matching(base: SparseAutoencoder, tuned: SparseAutoencoder) -> dict[str, Any]:
    """Dictionary features matched by decoder cosine (Hungarian); vanished base features and
    appeared fine-tuned features are those without a match at :data:`MATCH_THRESHOLD`."""
    if base.d_in != tuned.d_in:
        raise NnobsError(f"the SAEs read {base.d_in} and {tuned.d_in}-wide activations")
    a = torch.nn.functional.normalize(base.W_dec.detach().float().cpu(), dim=1)
    b = torch.nn.functional.normalize(tuned.W_dec.detach().float().cpu(), dim=1)
    cos = (a @ b.T).numpy()
    matching = hungarian(cos)
    similarity = np.nan_to_num(np.asarray(matching["similarity"], dtype=float), nan=-1.0)
    vanished = np.flatnonzero(similarity < MATCH_THRESHOLD)
    good = set(np.asarray(matching["match"])[similarity >= MATCH_THRESHOLD].tolist())
    appeared = [j for j in range(tuned.d_sae) if j not in good]
    return {**matching, "vanished": vanished.tolist(), "appeared": appeared}


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
