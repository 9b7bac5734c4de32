"""The decision-quality observability protocol (DESIGN.md section 2) on one frozen model.

Data flow: documents → token windows → :func:`nnobs.observe.capture.capture` (every layer in one
forward pass per batch, disk-backed) → statistics per layer → one plain-JSON result.

What the numbers mean:

- *label* and *pcorr*: the probe's label and its controlled statistic
  (:mod:`nnobs.observe.signal`).
- *seeds*: the sweep probe (seed 42) is fit on all training tokens; seeds 43–49 each fit a
  cluster-bootstrap resample of the training documents (the probe's objective is convex, so
  initialisation could not make seeds differ). A seed in nnobs is therefore a resample of the
  probe's training documents; in the reference method a seed also changes the probe's
  initialisation and its early-stopped Adam path. Seed agreement is the mean pairwise
  Spearman between those seeds' scores on the validation tokens.
- *headline*: the seed ensemble's pcorr on the test split at the chosen layer, with an
  interval over the test documents and the probe's training documents.
- *null* and *verdict*: the headline measured the same way on ``null_models`` random-init
  models of the same architecture (:mod:`nnobs.observe.null`); the verdict is a one-sided test
  at ``level`` (:mod:`nnobs.measure.nulltest`), and the floor is the value the headline must
  exceed.
- *held-out text*: when the model was trained on the same corpus (its provenance names the
  corpus fingerprint), the probe never sees the model's training documents: probe-train and
  probe-validation are the two halves (by document) of the corpus's validation split, and
  the test split is the corpus's test split.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from nnobs.data.corpus import SPLITS, Corpus, Document, corpus_info, load_corpus
from nnobs.data.windows import held_out_splits
from nnobs.measure import stats
from nnobs.measure.probes import LinearProbe
from nnobs.models.adapter import ModelAdapter, provenance
from nnobs.observe.capture import capture_scratch
from nnobs.observe.null import random_init_null
from nnobs.observe.settings import ObserveSettings
from nnobs.observe.signal import candidate_layers, label_diagnostic
from nnobs.observe.splits import (
    SplitData,
    capture_splits,
    final_site,
    layer_sites,
    model_trained_on,
)
from nnobs.observe.stages import (
    OUTPUT_PREDICTOR,
    baseline_statistics,
    control_sensitivity,
    cross_domain,
    evaluate_on_test,
    headline_under_label,
    layer_sweep,
    multiseed_evaluation,
    output_control,
)

SCHEMA = "nnobs.observe"
SCHEMA_VERSION = 2


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
    adapter.model.eval()
    docs, policy = held_out_splits(corpus, model_trained_on(adapter, corpus))
    scratch = capture_scratch("nnobs-capture-") if work_dir is None else None
    work_dir = scratch.path if scratch is not None else Path(work_dir)
    try:
        run = _ProtocolRun(adapter, docs, settings, work_dir, progress, log)
        results = run.measure(domain2)
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "provenance": provenance(adapter),
            "corpus": corpus_info(corpus),
            "domain2": corpus_info(domain2) if domain2 is not None else None,
            "split_policy": policy,
            "settings": asdict(settings),
            "model": {"n_layers": adapter.n_layers, "d_model": adapter.d_model},
            "tokens": run.tokens(),
            "bos": adapter.tokenizer.bos_id,
            **results,
            "timings_s": run.clock.seconds,
            "memory": {s: run.data[s].cap.stats for s in SPLITS},
        }
    finally:
        if scratch is not None:
            scratch.close()


class _ProtocolRun:
    """One run of the protocol: its stages in order, each timed, on one capture of the splits."""

    def __init__(
        self,
        adapter: ModelAdapter,
        docs: dict[str, list[Document]],
        settings: ObserveSettings,
        work_dir: Path,
        progress: bool,
        log: Callable[[str], None],
    ) -> None:
        self.adapter, self.docs, self.settings = adapter, docs, settings
        self.work_dir, self.progress, self.log = work_dir, progress, log
        self.clock = Stopwatch()
        self.device = str(adapter.device)
        self.sites = layer_sites(adapter, settings)
        self.data: dict[str, SplitData] = {}

    def measure(self, domain2: Corpus | None) -> dict[str, Any]:
        """Every stage's part of the result, in the result's order."""
        with self.clock.stage("capture"):
            wanted = list(dict.fromkeys([*self.sites.values(), final_site(self.adapter)]))
            self.data = capture_splits(
                self.adapter, self.docs, wanted, self.settings, self.work_dir, self.progress
            )
        selection, sweep_probes, probes = self._select_layer()
        layer = selection["layer"]
        site = self.sites[layer]
        self.log("test split, output control, controls, baselines")
        evaluation, score = self._evaluate(layer, site, probes)
        test = self.data["test"]
        with self.clock.stage("flagging"):
            flagging = stats.flag_catches(
                score, test.cap.max_softmax, test.cap.loss, self.settings.flag_rates
            )
        with self.clock.stage("null"):
            null = random_init_null(
                self.adapter,
                self.docs,
                layer,
                site,
                evaluation["headline"],
                self.settings,
                self.work_dir,
                self.progress,
                self.log,
            )
        cross = None
        if domain2 is not None:
            self.log(f"cross-domain: {domain2.name}")
            with self.clock.stage("cross_domain"):
                cross = cross_domain(
                    self.adapter,
                    domain2,
                    site,
                    probes,
                    score,
                    test,
                    self.settings,
                    self.work_dir,
                    self.progress,
                )
        return {
            **selection,
            **evaluation,
            "null": null,
            "verdict": verdict_statement(evaluation["headline"], null),
            "flagging": flagging,
            "cross_domain": cross,
            "probe": _probe_record(sweep_probes[layer], layer, site, self.settings.sweep_seed),
        }

    def _select_layer(self) -> tuple[dict[str, Any], dict[int, LinearProbe], list[LinearProbe]]:
        """Sweep every layer, evaluate every seed at the best candidates (validation split),
        and pick the layer with the best mean over seeds; returns the sweep probes and the
        chosen layer's seed probes too."""
        train, val = self.data["train"], self.data["validation"]
        self.log("layer sweep")
        with self.clock.stage("sweep"):
            sweep, sweep_probes = layer_sweep(train, val, self.sites, self.settings, self.device)
        candidates = candidate_layers(sweep, self.adapter.n_layers, self.settings)
        self.log("multi-seed evaluation")
        with self.clock.stage("multiseed"):
            multiseed, seed_probes = multiseed_evaluation(
                train, val, self.sites, candidates, self.settings, self.device
            )
        layer = max(multiseed, key=lambda r: r["mean"])["layer"]
        selection = {
            "sweep": sweep,
            "candidates": candidates,
            "multiseed": multiseed,
            "layer": layer,
        }
        return selection, sweep_probes, seed_probes[layer]

    def _evaluate(
        self, layer: int, site: str, probes: list[LinearProbe]
    ) -> tuple[dict[str, Any], np.ndarray]:
        """The chosen layer on the test split: headline, output control, covariate sets and
        baselines; returns them and the ensemble score."""
        train, test, settings = self.data["train"], self.data["test"], self.settings
        with self.clock.stage("test"):
            headline, seed_scores, score = evaluate_on_test(probes, test, layer, site, settings)
        with self.clock.stage("output_control"):
            last_site = final_site(self.adapter)
            controlled = output_control(
                train, test, site, last_site, score, settings.n_boot, self.device, seed_scores
            )
        with self.clock.stage("controls"):
            controls = control_sensitivity(score, train, test, site)
        with self.clock.stage("baselines"):
            baselines = baseline_statistics(test, site, settings)
        with self.clock.stage("labels"):
            other = "reference" if settings.label == "rank" else "rank"
            headline["by_label"] = {
                settings.label: headline["ensemble"],
                other: headline_under_label(train, test, site, settings, other, self.device),
            }
            labels = label_diagnostic(train, site)
        evaluation = {
            "label": labels,
            "headline": headline,
            "output_controlled": {"site": last_site, "predictor": OUTPUT_PREDICTOR, **controlled},
            "controls": controls,
            "baselines": baselines,
        }
        return evaluation, score

    def tokens(self) -> dict[str, dict[str, int]]:
        """Scored tokens and source documents per split, next to the budget."""
        budget = self.settings.token_budget(self.adapter.d_model)
        return {
            s: {
                "tokens": self.data[s].n,
                "documents": int(len(np.unique(self.data[s].cap.doc_ids))),
                "budget": budget,
            }
            for s in SPLITS
        }


def verdict_statement(headline: dict[str, Any], null: dict[str, Any] | None) -> dict[str, Any]:
    """The result's one-line answer, with the numbers it rests on."""
    value, (lo, hi) = headline["ensemble"], headline["ensemble_ci95"]
    where = f"layer {headline['layer']}: pcorr {value:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    if null is None:
        return {"signal": None, "statement": f"{where}; no null measured, so no verdict"}
    p, floor, level = null["p_value"], null["floor"], null["level"]
    verdict = "is" if null["significant"] else "is NOT"
    return {
        "signal": null["significant"],
        "p_value": p,
        "floor": floor,
        "level": level,
        "statement": (
            f"the signal {verdict} above what random-init models of this architecture give "
            f"({where}; null {null['null_mean']:+.3f} from {null['n_null']} "
            f"model{'s' if null['n_null'] > 1 else ''}, floor "
            f"{floor:+.3f}, p = {p:.3g}, level {level:g})"
        ),
    }


def _probe_record(probe: LinearProbe, layer: int, site: str, seed: int) -> dict[str, Any]:
    """The reported layer's sweep probe, for later use (e.g. the ablation direction test)."""
    return {
        "layer": layer,
        "site": site,
        "seed": seed,
        "direction": probe.direction.tolist(),
        "coef": probe.coef_.tolist(),
        "intercept": float(probe.intercept_),
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
    result = to_plain(
        observe(adapter, corpus, settings=settings, domain2=domain2, progress=progress, log=log)
    )
    validate(result)
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_result(out_dir / "observe.json", result)
    return result
