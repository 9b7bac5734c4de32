"""The decision-quality observability protocol (DESIGN.md section 2) on one frozen model.

Data flow: documents → token windows → :func:`nnobs.observe.capture.capture` (every layer in one
forward pass per batch, disk-backed) → statistics per layer → one plain-JSON result.

What the numbers mean:

- *label*: the OLS residual of loss on ``max_softmax + norm + 1`` (fit on the probe's training
  tokens, per layer since ``norm`` is that layer's activation norm) is positive: the token is
  worse than confidence predicts.
- *pcorr*: partial Spearman correlation between a probe's score and loss, controlling for max
  softmax and the layer's activation norm.
- *seeds*: the sweep probe (seed 42) is fit on all training tokens; seeds 43–49 each fit a
  cluster-bootstrap resample of the training documents (the probe's objective is convex, so
  initialisation could not make seeds differ). Seed agreement is the mean pairwise Spearman
  between those seeds' scores on the validation tokens.
- *held-out text*: when the model was trained on the same corpus (its provenance names the
  corpus fingerprint), the probe never sees the model's training documents: probe-train and
  probe-validation are the two halves (by document) of the corpus's validation split, and
  the test split is the corpus's test split.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nnobs.core.errors import NnobsError
from nnobs.data.corpus import Corpus, Document, corpus_info, load_corpus
from nnobs.data.encoding import encode_documents
from nnobs.measure import stats
from nnobs.measure.predictors import LossMLP, NonlinearControl
from nnobs.measure.probes import (
    LinearProbe,
    fit_resampled,
    linear_scores,
    random_head_scores,
)
from nnobs.models.adapter import ModelAdapter, provenance
from nnobs.observe.capture import Capture, Windows, capture, make_windows

SCHEMA = "nnobs.observe"
SCHEMA_VERSION = 1
SPLITS = ("train", "validation", "test")
CONTROL_SETS = ("none", "softmax_only", "norm_only", "standard", "plus_entropy", "nonlinear")


@dataclass
class ObserveSettings:
    """Every choice the protocol makes; stored in the result so a run can be repeated."""

    ex_per_dim: int = 350
    seq_len: int | None = None
    batch_size: int = 16
    site_kind: str = "resid_post"
    layers: list[int] | None = None
    n_candidates: int = 3
    max_depth_fraction: float = 0.8
    sweep_seed: int = 42
    seeds: list[int] = field(default_factory=lambda: list(range(43, 50)))
    flag_rates: list[float] = field(default_factory=lambda: [0.05, 0.10, 0.20, 0.30])
    n_boot: int = 1000
    random_heads: int = 100
    random_init_floor: bool = True
    store_dtype: str = "float16"
    window_seed: int = 0

    def __post_init__(self) -> None:
        if self.ex_per_dim < 1:
            raise NnobsError(f"ex_per_dim must be a positive integer, got {self.ex_per_dim}")
        if len(self.seeds) < 2:
            raise NnobsError("the protocol needs at least 2 seeds to measure seed agreement")
        if self.store_dtype not in ("float16", "float32"):
            raise NnobsError(f"store_dtype must be float16 or float32, got {self.store_dtype!r}")
        if not 0 < self.max_depth_fraction <= 1:
            raise NnobsError("max_depth_fraction must be in (0, 1]")


@dataclass
class SplitData:
    """One split's captured tokens, with the columns every statistic needs."""

    name: str
    cap: Capture
    _controlled: dict[str, stats.PartialSpearman] = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return len(self.cap.loss)

    def acts(self, site: str) -> np.ndarray:
        return self.cap.acts[site]

    def covariates(self, site: str, *extra: np.ndarray) -> np.ndarray:
        """The standard controls (max softmax, the site's norm) plus any extra columns."""
        return np.column_stack([self.cap.max_softmax, self.cap.norms[site], *extra])

    def controlled(self, site: str) -> stats.PartialSpearman:
        """pcorr against this split's loss under the standard controls, prepared once per site
        (every probe and seed scored here shares the ranking of loss and covariates)."""
        if site not in self._controlled:
            self._controlled[site] = stats.PartialSpearman(self.cap.loss, self.covariates(site))
        return self._controlled[site]


class Stopwatch:
    """Wall time per protocol stage, reported in the result."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


# ------------------------------------------------------------------------------ data


def _half(doc: Document) -> int:
    return hashlib.sha256(doc.id.encode()).digest()[0] & 1


def model_trained_on(adapter: ModelAdapter, corpus: Corpus) -> bool:
    """Whether the model's training split is this corpus's training split.

    True for the same content, and for the same spec (a run capped by ``max_chars`` trained on a
    subset of the same hash-assigned training documents).
    """
    prov = adapter.provenance
    return prov.get("corpus_fingerprint") == corpus.fingerprint or (
        prov.get("corpus_spec") is not None and prov.get("corpus_spec") == corpus.name
    )


def held_out_splits(corpus: Corpus, model_saw_train: bool) -> tuple[dict[str, list], str]:
    """Documents for the probe's train/validation/test splits, and the policy used."""
    if not model_saw_train:
        return {s: corpus.split(s) for s in SPLITS}, "corpus splits"
    val = corpus.validation
    train = [d for d in val if _half(d) == 0]
    validation = [d for d in val if _half(d) == 1]
    if not train or not validation:
        raise NnobsError(
            "the corpus's validation split is too small to hold out two halves from the "
            "model's training text; use a larger corpus"
        )
    policy = "model trained on this corpus: probe train/validation = halves of its validation split"
    return {"train": train, "validation": validation, "test": corpus.test}, policy


def window_length(adapter: ModelAdapter, requested: int | None) -> int:
    context = adapter.provenance.get("max_seq_len") or adapter.provenance.get("context_length")
    if requested is not None:
        if context and requested > context:
            raise NnobsError(f"seq_len {requested} exceeds the model's context of {context} tokens")
        return requested
    return int(min(context or 256, 256))


def document_spans(tokens: list[np.ndarray], max_tokens: int, seed: int) -> list[np.ndarray]:
    """A seeded random contiguous span of at most ``max_tokens`` scored tokens per document.

    Spreads a small token budget over many documents (more independent clusters for the
    bootstrap) without favouring their openings (licence headers, imports).
    """
    out = []
    for i, ids in enumerate(tokens):
        extra = len(ids) - (max_tokens + 1)
        start = int(np.random.default_rng([seed, i]).integers(0, extra + 1)) if extra > 0 else 0
        out.append(ids[start : start + max_tokens + 1])
    return out


def even_cap(tokens: list[np.ndarray], budget: int, slack: float = 1.1) -> int | None:
    """The smallest per-document token cap that still leaves ``budget`` scored tokens.

    Taking whole files would fill the budget from a handful of long documents (a stdlib split
    of 44.8k tokens came from 6 files), so the probe would learn those files and the cluster
    bootstrap would have almost no clusters. Capping every document at the water level spreads
    the budget over as many documents as the split has. ``slack`` leaves room for the windows'
    rounding; None when even whole documents do not reach the budget (the window builder then
    reports the shortfall).
    """
    scored = np.sort(np.array([max(len(t) - 1, 0) for t in tokens], dtype=np.int64))
    goal = int(budget * slack)
    if scored.sum() < goal:
        return None if scored.sum() < budget else int(scored[-1])
    # sum(min(scored, c)) >= goal for the smallest c: walk the sorted lengths.
    below = 0
    for i, length in enumerate(scored):
        remaining = len(scored) - i
        if below + length * remaining >= goal:
            return int(np.ceil((goal - below) / remaining))
        below += length
    return int(scored[-1])


def split_windows(
    adapter: ModelAdapter,
    docs: dict[str, list[Document]],
    settings: ObserveSettings,
    max_doc_tokens: int | None = None,
) -> dict[str, Windows]:
    """Each split's token windows at the token budget (ex_per_dim × d_model tokens), with at
    most ``max_doc_tokens`` from any one document (a random span of it); by default the cap
    that spreads the budget over every document of the split (:func:`even_cap`).

    They depend on the tokenizer, width and context only, so checkpoints of one run share them.
    """
    if adapter.tokenizer is None:
        raise NnobsError("the model has no tokenizer; load it from a directory that has one")
    budget = settings.ex_per_dim * adapter.d_model
    seq_len = window_length(adapter, settings.seq_len)

    def tokens(split_docs: list[Document]) -> list[np.ndarray]:
        ids = encode_documents(split_docs, adapter.tokenizer)
        cap = max_doc_tokens if max_doc_tokens is not None else even_cap(ids, budget)
        return ids if cap is None else document_spans(ids, cap, settings.window_seed)

    return {
        split: make_windows(
            tokens(split_docs),
            seq_len,
            max_tokens=budget,
            seed=settings.window_seed,
            split=split,
        )
        for split, split_docs in docs.items()
    }


def capture_splits(
    adapter: ModelAdapter,
    docs: dict[str, list[Document]],
    sites: list[str],
    settings: ObserveSettings,
    work_dir: Path | None,
    progress: bool,
    label: str = "",
    windows: dict[str, Windows] | None = None,
) -> dict[str, SplitData]:
    """Capture ``sites`` on each split (windows from :func:`split_windows` unless given);
    ``work_dir`` None keeps the arrays in memory."""
    windows = windows if windows is not None else split_windows(adapter, docs, settings)
    dtype = np.float16 if settings.store_dtype == "float16" else np.float32
    out = {}
    for split in docs:
        cap = capture(
            adapter,
            windows[split],
            sites,
            batch_size=settings.batch_size,
            dtype=dtype,
            directory=None if work_dir is None else work_dir / f"{label}{split}",
            progress=progress,
            desc=f"capture {label}{split}",
        )
        out[split] = SplitData(split, cap)
    return out


# ------------------------------------------------------------------------- statistics


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


# --------------------------------------------------------------------------- protocol


def observe(
    adapter: ModelAdapter,
    corpus: Corpus,
    *,
    settings: ObserveSettings | None = None,
    domain2: Corpus | None = None,
    work_dir: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda _msg: None,
) -> dict[str, Any]:
    """Run the whole protocol on a frozen model; return the result document (plain data)."""
    settings = settings or ObserveSettings()
    clock = Stopwatch()
    device = str(adapter.device)
    adapter.model.eval()
    layers = settings.layers if settings.layers is not None else list(range(adapter.n_layers))
    sites = {layer: adapter.site_name(layer, settings.site_kind) for layer in layers}
    last_site = adapter.site_name(adapter.n_layers - 1, "resid_post")
    capture_sites = list(dict.fromkeys([*sites.values(), last_site]))

    docs, policy = held_out_splits(corpus, model_trained_on(adapter, corpus))
    owns_work_dir = work_dir is None
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="nnobs-capture-"))
    try:
        with clock.stage("capture"):
            data = capture_splits(adapter, docs, capture_sites, settings, work_dir, progress)
        train, val, test = data["train"], data["validation"], data["test"]

        log("layer sweep")
        with clock.stage("sweep"):
            sweep, sweep_probes = [], {}
            for layer, site in sites.items():
                probe = sweep_probes[layer] = fit_probe(
                    train, site, settings.sweep_seed, False, device
                )
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
        candidates = candidate_layers(sweep, adapter.n_layers, settings)

        log("multi-seed evaluation")
        with clock.stage("multiseed"):
            multiseed, seed_probes = [], {}
            for layer in candidates:
                site = sites[layer]
                probes = fit_seed_probes(train, site, settings.seeds, device)
                scores = linear_scores(probes, val.acts(site))
                values = pcorr(scores, val, site)
                multiseed.append(
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
                seed_probes[layer] = probes
        best = max(multiseed, key=lambda r: r["mean"])
        layer, site = best["layer"], sites[best["layer"]]
        probes = seed_probes[layer]

        log("test split, output control, controls, baselines")
        with clock.stage("test"):
            test_scores = linear_scores(probes, test.acts(site))
            per_seed = pcorr(test_scores, test, site)
            score = ensemble_score(test_scores)
            loss = test.cap.loss
            standard = test.covariates(site)
            headline = {
                "layer": layer,
                "site": site,
                "split": "test",
                "seeds": list(settings.seeds),
                "per_seed": per_seed,
                **seed_summary(per_seed),
                "ensemble": pcorr(score, test, site),
                "ensemble_ci95": ci(score, test, standard, settings.n_boot),
            }

        with clock.stage("output_control"):
            oc_model = LossMLP(seed=0, device=device).fit(train.acts(last_site), train.cap.loss)
            oc_pred = oc_model.predict(test.acts(last_site))
            with_oc = test.covariates(site, oc_pred)
            oc_r2 = 1 - np.mean((loss - oc_pred) ** 2) / np.var(loss)
            # seeds and ensemble in one call: loss and the three covariates are ranked once
            *oc_per_seed, oc_ensemble = pcorr(
                np.column_stack([test_scores, score]), test, site, oc_pred
            )
            output_controlled = {
                "site": last_site,
                "predictor": "MLP d→64→1 (ReLU) on the last layer, fit on probe-train tokens",
                "predictor_r2_test": float(oc_r2),
                "per_seed": oc_per_seed,
                "ensemble": oc_ensemble,
                "ensemble_ci95": ci(score, test, with_oc, settings.n_boot),
            }
            output_controlled["mean"] = float(np.mean(output_controlled["per_seed"]))

        with clock.stage("controls"):
            controls = control_sensitivity(score, train, test, site)

        with clock.stage("baselines"):
            baselines = baseline_statistics(test, site, settings)

        with clock.stage("flagging"):
            flagging = stats.flag_catches(score, test.cap.max_softmax, loss, settings.flag_rates)

        with clock.stage("floor"):
            floor = detection_floor(
                adapter, docs, sites, baselines, settings, work_dir, progress, log
            )

        cross = None
        if domain2 is not None:
            log(f"cross-domain: {domain2.name}")
            with clock.stage("cross_domain"):
                cross = cross_domain(
                    adapter, domain2, site, probes, score, test, settings, work_dir, progress
                )

        probe42 = sweep_probes[layer]
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "provenance": provenance(adapter),
            "corpus": corpus_info(corpus),
            "domain2": corpus_info(domain2) if domain2 is not None else None,
            "split_policy": policy,
            "settings": asdict(settings),
            "model": {"n_layers": adapter.n_layers, "d_model": adapter.d_model},
            "tokens": {
                s: {
                    "tokens": data[s].n,
                    "documents": int(len(np.unique(data[s].cap.doc_ids))),
                    "budget": settings.ex_per_dim * adapter.d_model,
                }
                for s in SPLITS
            },
            "sweep": sweep,
            "candidates": candidates,
            "multiseed": multiseed,
            "layer": layer,
            "headline": headline,
            "output_controlled": output_controlled,
            "controls": controls,
            "baselines": baselines,
            "floor": floor,
            "flagging": flagging,
            "cross_domain": cross,
            "probe": {
                "layer": layer,
                "site": site,
                "seed": settings.sweep_seed,
                "direction": probe42.direction.tolist(),
                "coef": probe42.coef_.tolist(),
                "intercept": float(probe42.intercept_),
            },
            "timings_s": clock.seconds,
            "memory": {s: data[s].cap.stats for s in SPLITS},
        }
    finally:
        if owns_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)


def control_sensitivity(score: np.ndarray, train: SplitData, test: SplitData, site: str) -> dict:
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


def baseline_statistics(test: SplitData, site: str, settings: ObserveSettings) -> dict:
    """Hand-designed statistics and random heads through the same controlled statistic."""
    out: dict[str, Any] = {}
    for name, value in hand_statistics(test.acts(site)).items():
        try:
            out[name] = {"pcorr": pcorr(value, test, site)}
        except NnobsError as err:  # the norm baseline is a covariate itself: controlled away
            out[name] = {"pcorr": None, "note": str(err)}
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


def detection_floor(
    adapter: ModelAdapter,
    docs: dict[str, list[Document]],
    sites: dict[int, str],
    baselines: dict,
    settings: ObserveSettings,
    work_dir: Path,
    progress: bool,
    log: Callable[[str], None],
) -> dict:
    """pcorr where no learned signal can exist: the same architecture, randomly initialised.

    Probes are trained at every layer of the random-init model exactly as on the real one (the
    sweep seed and every multi-seed seed), and random heads are read there too. The floor is the
    95% quantile of the absolute null values: a null comes out negative as easily as positive.
    Random heads on the *trained* model are a baseline, not a null (a random readout of a
    trained representation can carry signal), and are reported under ``baselines``.
    """
    if not settings.random_init_floor:
        values = np.abs(baselines["random_head"]["values"])
        summary = stats.detection_floor(values)
        return {
            "value": summary["floor"],
            "quantile": summary["quantile"],
            "n_null": summary["n"],
            "source": "random heads on the trained model (random-init floor skipped)",
            "random_init": None,
        }
    log("detection floor: random-init model")
    from nnobs.models.load import random_init_like

    fresh = random_init_like(adapter, seed=0)
    null_docs = {"train": docs["train"], "validation": docs["validation"]}
    data = capture_splits(
        fresh, null_docs, list(sites.values()), settings, work_dir, progress, "random-init-"
    )
    train, val = data["train"], data["validation"]
    per_layer, nulls = {}, []
    device = str(fresh.device)
    for layer, site in sites.items():
        probes = [
            fit_probe(train, site, settings.sweep_seed, False, device),
            *fit_seed_probes(train, site, settings.seeds, device),
        ]
        values = pcorr(linear_scores(probes, val.acts(site)), val, site)
        head_values = np.asarray(pcorr(random_head_scores(val.acts(site), 20), val, site))
        per_layer[layer] = {
            "probe_pcorr": values,
            "random_head_mean_abs": float(np.abs(head_values).mean()),
        }
        nulls.extend(np.abs(values))
        nulls.extend(np.abs(head_values))
    summary = stats.detection_floor(np.asarray(nulls))
    return {
        "value": summary["floor"],
        "quantile": summary["quantile"],
        "n_null": summary["n"],
        "source": "probes (all seeds) and 20 random heads per layer on a random-init model",
        "random_init": {"split": "validation", "tokens": val.n, "per_layer": per_layer},
    }


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
) -> dict:
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


# ------------------------------------------------------------------------- provenance


def default_domain2(corpus_spec: str) -> str | None:
    """The stdlib's own test package is the natural second domain for the stdlib corpus."""
    return "stdlib-tests" if corpus_spec == "stdlib" else None


def observe_model(
    model: str | Path | ModelAdapter,
    corpus: str | Corpus = "stdlib",
    *,
    domain2: str | Corpus | None = "auto",
    out_dir: str | Path | None = None,
    settings: ObserveSettings | None = None,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = lambda _msg: None,
) -> dict[str, Any]:
    """Load a model and a corpus, run the protocol, and (with ``out_dir``) write its files.

    ``out_dir`` receives ``observe.json`` (validated against the schema and written
    atomically, so a failed run never leaves a complete-looking result); plots are the
    report layer's (:func:`nnobs.report.plots.layer_profile`).
    """
    from nnobs.core.results import to_plain, validate, write_result
    from nnobs.models.load import load_model

    adapter = model if isinstance(model, ModelAdapter) else load_model(model, device=device)
    if isinstance(corpus, str):
        if domain2 == "auto":
            domain2 = default_domain2(corpus)
        corpus = load_corpus(corpus)
    elif domain2 == "auto":
        domain2 = None
    if isinstance(domain2, str):
        domain2 = load_corpus(domain2)
    doc = to_plain(
        observe(adapter, corpus, settings=settings, domain2=domain2, progress=progress, log=log)
    )
    validate(doc)
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_result(out_dir / "observe.json", doc)
    return doc
