"""Observability over training: the protocol's tracked subset at every checkpoint of a run.

Per checkpoint (DESIGN.md section 2, "Over training"):

- *layer profile*: the sweep probe (seed 42) at every layer, pcorr on the validation split
  with a cluster-bootstrap 95% CI (documents resampled);
- *best layer*: the top layer of that profile within ``max_depth_fraction`` of depth; probes
  for ``seeds`` (bootstrap resamples of the training documents), pcorr per seed on the test
  split, their ensemble with a CI, and seed agreement;
- *output-controlled residual*: the ensemble's pcorr with an MLP's loss prediction from the
  last layer as an extra covariate;
- *random heads* at the best layer (null values for the floor);
- optionally, attribute probes per layer (:mod:`nnobs.observe.attribute_probes`).

Once per run: the detection floor (step 0 is the randomly initialised model, probed at every
layer, pooled with the random heads of the last checkpoint), linear CKA of every layer to the
same layer of the last checkpoint, the last checkpoint's layer × layer CKA, and the collapse
verdict (:mod:`nnobs.observe.collapse`).

Shared across checkpoints instead of repeated per ``nnobs observe`` call: loading the corpus,
the document splits, the tokenizer, the tokenisation and the token windows (every checkpoint
is measured on the same tokens, which is also what makes CKA across checkpoints meaningful),
and the floor. Probes are not warm-started: the probe's objective is convex and solved to its
optimum, so a warm start could only save a few solver iterations.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nnobs.core.errors import NnobsError
from nnobs.core.rundir import RunDir
from nnobs.data.corpus import Corpus, corpus_info, load_corpus
from nnobs.measure import stats
from nnobs.measure.predictors import LossMLP
from nnobs.measure.probes import linear_scores, random_head_scores
from nnobs.models.adapter import ModelAdapter, provenance
from nnobs.observe.capture import Windows
from nnobs.observe.protocol import (
    ObserveSettings,
    SplitData,
    candidate_layers,
    capture_splits,
    ci,
    ensemble_score,
    fit_probe,
    fit_seed_probes,
    held_out_splits,
    model_trained_on,
    pcorr,
    seed_summary,
    split_windows,
)

SCHEMA = "nnobs.trajectory"
SCHEMA_VERSION = 1
OBSERVED = ("observed", "shrunk")
# Captures above this many bytes go to disk as memory maps instead of RAM.
_IN_MEMORY_BYTES = 1 << 30


@dataclass
class TrajectorySettings(ObserveSettings):
    """The protocol's settings, with the cheaper defaults of the tracked subset.

    ``seeds`` are the best layer's probe seeds; ``n_boot`` the bootstrap resamples of every CI;
    ``doc_tokens`` caps the tokens taken from one document (a random span), so a small budget
    still spans many documents; ``cka_tokens`` the validation tokens compared by CKA;
    ``attributes`` adds attribute probes.
    """

    seeds: list[int] = field(default_factory=lambda: [43, 44, 45])
    n_boot: int = 200
    doc_tokens: int | None = 256
    cka_tokens: int = 2048
    attributes: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.doc_tokens is not None and self.doc_tokens < 1:
            raise NnobsError(f"doc_tokens must be a positive integer, got {self.doc_tokens}")
        if self.cka_tokens < 4:
            raise NnobsError(f"cka_tokens must be at least 4, got {self.cka_tokens}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrajectorySettings:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise NnobsError(
                f"unknown observation setting(s) {', '.join(unknown)}: "
                f"known settings are {', '.join(sorted(known))}"
            )
        return cls(**data)


class TrajectoryObserver:
    """Measures checkpoints of one run on shared data and assembles the trajectory result.

    Feed it checkpoints in any order with :meth:`observe` (or :meth:`skip` to record a step
    that was not measured); :meth:`document` builds the result from what it has so far, so a
    live run can write it after every checkpoint. Use it as a context manager: it owns a
    temporary directory for captures and CKA samples.
    """

    def __init__(
        self,
        corpus: Corpus,
        settings: TrajectorySettings | None = None,
        *,
        progress: bool = False,
        log: Callable[[str], None] = lambda _msg: None,
    ) -> None:
        self.corpus = corpus
        self.settings = settings or TrajectorySettings()
        self.progress, self.log = progress, log
        self.records: dict[int, dict[str, Any]] = {}
        self.random_init: dict[str, Any] | None = None
        self.work = Path(tempfile.mkdtemp(prefix="nnobs-trajectory-"))
        # Removed on close() or, failing that, when the observer is garbage-collected.
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.work, True)
        self._docs: dict[str, list] | None = None
        self._policy = ""
        self._windows: dict[str, Windows] | None = None
        self._key: tuple | None = None
        self._cka_files: dict[int, dict[int, Path]] = {}
        self._provenance: dict[str, Any] = {}
        self._model: dict[str, Any] = {}
        self.shared_seconds = 0.0

    def __enter__(self) -> TrajectoryObserver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._cleanup()

    # -------------------------------------------------------------------- shared data

    def _prepare(self, adapter: ModelAdapter) -> dict[str, Windows]:
        """Document splits and token windows, made once per tokenizer, width and context."""
        key = (
            getattr(adapter.tokenizer, "fingerprint", None),
            adapter.d_model,
            adapter.n_layers,
            adapter.provenance.get("max_seq_len") or adapter.provenance.get("context_length"),
        )
        if self._windows is not None:
            if key != self._key:
                raise NnobsError(
                    "checkpoints of one trajectory must share tokenizer, width, depth and "
                    f"context; got {key} after {self._key}"
                )
            return self._windows
        start = time.perf_counter()
        self._docs, self._policy = held_out_splits(
            self.corpus, model_trained_on(adapter, self.corpus)
        )
        try:
            self._windows = split_windows(
                adapter, self._docs, self.settings, self.settings.doc_tokens
            )
        except NnobsError:
            if self.settings.doc_tokens is None:
                raise
            # Too few documents to fill the budget at doc_tokens each: take whole documents.
            self._windows = split_windows(adapter, self._docs, self.settings)
            self._policy += "; too few documents for the doc_tokens cap, so none was applied"
        self._key = key
        self.shared_seconds += time.perf_counter() - start
        return self._windows

    def _capture(
        self, adapter: ModelAdapter, sites: list[str], fraction: float, splits=None
    ) -> dict[str, SplitData]:
        windows = self._prepare(adapter)
        splits = splits or list(windows)
        if fraction < 1:
            windows = {s: _head(w, fraction) for s, w in windows.items()}
        n_tokens = sum(windows[s].n_tokens for s in splits)
        size = n_tokens * len(sites) * adapter.d_model * 2
        work_dir = None if size < _IN_MEMORY_BYTES else self.work / "capture"
        docs = {s: self._docs[s] for s in splits}
        return capture_splits(
            adapter, docs, sites, self.settings, work_dir, self.progress, windows=windows
        )

    def _sites(self, adapter: ModelAdapter) -> dict[int, str]:
        layers = self.settings.layers
        layers = list(range(adapter.n_layers)) if layers is None else layers
        return {layer: adapter.site_name(layer, self.settings.site_kind) for layer in layers}

    # ----------------------------------------------------------------------- measure

    def observe(
        self,
        adapter: ModelAdapter,
        step: int,
        *,
        meta: dict[str, Any] | None = None,
        fraction: float = 1.0,
        note: str | None = None,
    ) -> dict[str, Any]:
        """Measure one checkpoint (``fraction`` < 1 uses that share of every split's windows).

        A statistic that cannot be computed (e.g. a degenerate model) marks the record
        ``failed`` with the reason instead of stopping the trajectory.
        """
        if not 0 < fraction <= 1:
            raise NnobsError(f"fraction must be in (0, 1], got {fraction}")
        self._provenance = provenance(adapter)
        self._model = {"n_layers": adapter.n_layers, "d_model": adapter.d_model}
        record = _base_record(step, meta)
        record.update(status="observed" if fraction == 1 else "shrunk", fraction=fraction)
        record["note"] = note
        val = self._measure(adapter, record, fraction)
        if val is None:
            self.log(f"step {step}: not measured ({record['note']})")
        else:
            self._keep_cka_sample(step, val, self._sites(adapter))
        self.records[step] = record
        return record

    def _measure(
        self, adapter: ModelAdapter, record: dict[str, Any], fraction: float
    ) -> SplitData | None:
        """Fill ``record`` with the tracked subset; returns the validation split (None when
        the record failed)."""
        start = time.perf_counter()
        adapter.model.eval()
        s = self.settings
        device = str(adapter.device)
        sites = self._sites(adapter)
        last_site = adapter.site_name(adapter.n_layers - 1, "resid_post")
        try:
            data = self._capture(
                adapter, list(dict.fromkeys([*sites.values(), last_site])), fraction
            )
            train, val, test = data["train"], data["validation"], data["test"]
            record["tokens"] = {name: split.n for name, split in data.items()}
            record["capture_val_loss"] = float(np.mean(val.cap.loss))
            record["layers"] = self._profile(train, val, sites, device)
            measured = [r for r in record["layers"] if r["pcorr"] is not None]
            layer = candidate_layers(measured, adapter.n_layers, s)[0]
            site = sites[layer]
            probes = fit_seed_probes(train, site, s.seeds, device)
            X = test.acts(site)
            scores = linear_scores(probes, X)
            per_seed = pcorr(scores, test, site)
            score = ensemble_score(scores)
            loss, cov = test.cap.loss, test.covariates(site)
            record["best"] = {
                "layer": layer,
                "site": site,
                "split": "test",
                "seeds": list(s.seeds),
                "per_seed": per_seed,
                **seed_summary(per_seed),
                "seed_agreement": stats.seed_agreement(scores.T),
                "ensemble": pcorr(score, test, site),
                "ensemble_ci95": ci(score, test, cov, s.n_boot),
            }
            oc_model = LossMLP(seed=0, device=device).fit(train.acts(last_site), train.cap.loss)
            oc_pred = oc_model.predict(test.acts(last_site))
            with_oc = test.covariates(site, oc_pred)
            record["output_controlled"] = {
                "site": last_site,
                "predictor_r2_test": float(1 - np.mean((loss - oc_pred) ** 2) / np.var(loss)),
                "ensemble": pcorr(score, test, site, oc_pred),
                "ensemble_ci95": ci(score, test, with_oc, s.n_boot),
            }
            values = np.abs(pcorr(random_head_scores(X, s.random_heads), test, site))
            record["random_head"] = {
                "n": s.random_heads,
                "abs_q95": float(np.quantile(values, 0.95)),
                "abs_values": values.tolist(),
            }
            if s.attributes:
                record["attributes"] = self._attributes(adapter, sites)
        except NnobsError as err:
            record.update(status="failed", note=str(err))
            val = None
        record["seconds"] = round(time.perf_counter() - start, 3)
        return val

    def _profile(
        self, train: SplitData, val: SplitData, sites: dict[int, str], device: str
    ) -> list[dict[str, Any]]:
        """Sweep probe per layer: validation pcorr with its cluster-bootstrap CI.

        A layer where the statistic is undefined (e.g. a collapsed, constant representation)
        gets ``pcorr: null`` and the reason; the other layers are still measured.
        """
        rows = []
        for layer, site in sites.items():
            row: dict[str, Any] = {"layer": layer, "site": site}
            try:
                probe = fit_probe(train, site, self.settings.sweep_seed, False, device)
                score = probe.decision_function(val.acts(site))
                cov = val.covariates(site)
                row.update(
                    pcorr=pcorr(score, val, site),
                    ci95=ci(score, val, cov, self.settings.n_boot),
                    spearman=stats.partial_spearman(score, val.cap.loss),
                )
            except NnobsError as err:
                row.update(pcorr=None, ci95=None, spearman=None, note=str(err))
            rows.append(row)
        if all(r["pcorr"] is None for r in rows):
            raise NnobsError(f"no layer could be measured ({rows[0]['note']})")
        return rows

    def _attributes(self, adapter: ModelAdapter, sites: dict[int, str]) -> dict[str, Any]:
        """Attribute probes per layer (probe-train documents → test documents), compacted to
        one list per statistic with one value per layer."""
        from nnobs.observe.attribute_probes import attribute_dataset, probe_attributes

        budget = self.settings.ex_per_dim * adapter.d_model
        data = {
            split: attribute_dataset(
                adapter,
                self._docs[split],
                list(sites.values()),
                budget,
                self.settings.seq_len,
                seed=self.settings.window_seed,
                batch_size=self.settings.batch_size,
            )
            for split in ("train", "test")
        }
        result = probe_attributes(data["train"], data["test"])
        keys = ("accuracy", "control_accuracy", "selectivity", "majority_baseline")
        return {
            name: {key: [attr["sites"][site].get(key) for site in sites.values()] for key in keys}
            for name, attr in result["attributes"].items()
        }

    def skip(self, step: int, reason: str, meta: dict[str, Any] | None = None) -> None:
        """Record a checkpoint that was not measured, and why."""
        record = _base_record(step, meta)
        record.update(status="skipped", note=reason, seconds=0.0)
        self.records[step] = record

    def observe_random_init(self, adapter: ModelAdapter) -> None:
        """Measure a freshly initialised model of the same architecture: the floor's null
        model when the run has no step-0 checkpoint."""
        from nnobs.models.load import random_init_like

        record: dict[str, Any] = {"source": "random_init_like(seed=0)"}
        self._measure(random_init_like(adapter, seed=0), record, 1.0)
        self.random_init = record

    def _keep_cka_sample(self, step: int, val: SplitData, sites: dict[int, str]) -> None:
        """The first ``cka_tokens`` validation tokens per layer (the same tokens every step)."""
        n = min(self.settings.cka_tokens, val.n)
        files = {}
        for layer, site in sites.items():
            path = self.work / f"cka-{step}-{layer}.npy"
            np.save(path, np.asarray(val.acts(site)[:n]), allow_pickle=False)
            files[layer] = path
        self._cka_files[step] = files

    # -------------------------------------------------------------------- assemble

    def floor(self) -> dict[str, Any] | None:
        """pcorr where no learned signal can exist: the randomly initialised model (step 0, or
        :meth:`observe_random_init`), probed at every layer and read by random heads at its
        best layer; the floor is the 95% quantile of those |pcorr|.

        Random heads on *trained* checkpoints are not pooled in: random directions of a trained
        residual stream carry learned structure (their |pcorr| grows with training), so they
        are a baseline for the probe, reported per checkpoint, not a null for the signal.
        """
        init = self.random_init
        if 0 in self.records:
            init = {"source": "step 0 checkpoint", **self.records[0]}
        if init is None or init.get("status") == "failed" or "random_head" not in init:
            return None
        layer_values = np.abs([r["pcorr"] for r in init["layers"] if r["pcorr"] is not None])
        summary = stats.detection_floor(
            np.concatenate([layer_values, init["random_head"]["abs_values"]])
        )
        return {
            "value": summary["floor"],
            "quantile": summary["quantile"],
            "n_null": summary["n"],
            "source": init["source"],
            "random_init_per_layer": [r["pcorr"] for r in init["layers"]],
            "random_init_heads_abs_q95": init["random_head"]["abs_q95"],
        }

    def observed(self) -> list[dict[str, Any]]:
        return [
            self.records[k] for k in sorted(self.records) if self.records[k]["status"] in OBSERVED
        ]

    def cka(self) -> dict[str, Any] | None:
        """CKA of every layer to the same layer at the last observed step, and that step's
        layer × layer matrix; fills ``cka_to_final`` in each record."""
        from nnobs.measure.cka import cka_matrix, linear_cka

        steps = [r["step"] for r in self.observed() if r["step"] in self._cka_files]
        if not steps:
            return None
        ref = self._cka_files[steps[-1]]
        ref_acts = {layer: np.load(path) for layer, path in ref.items()}
        for step in steps:
            row = []
            for layer, path in self._cka_files[step].items():
                X, Y = np.load(path), ref_acts[layer]
                n = min(len(X), len(Y))
                row.append(linear_cka(X[:n], Y[:n]))
            self.records[step]["cka_to_final"] = row
        names, _, matrix = cka_matrix({str(k): v for k, v in ref_acts.items()})
        return {
            "method": "linear",
            "reference_step": steps[-1],
            "tokens": int(min(len(a) for a in ref_acts.values())),
            "split": "validation",
            "layers": [int(n) for n in names],
            "matrix": matrix.tolist(),
        }

    def document(
        self, loss_curve: list[dict[str, Any]], *, mode: str, run: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The trajectory result so far (plain data, schema ``nnobs.trajectory``)."""
        from nnobs.observe.collapse import detect_collapse

        floor = self.floor()
        cka = self.cka()
        observed = self.observed()
        collapse = None
        if floor is not None and len(observed) >= 2:
            # The trainer's validation loss where every step has one; else the mean loss on
            # the probe's validation tokens, which every measured checkpoint has.
            key = "val_loss" if all(r["val_loss"] is not None for r in observed) else None
            collapse = detect_collapse(
                steps=[r["step"] for r in observed],
                val_loss=[r[key or "capture_val_loss"] for r in observed],
                pcorr={
                    layer["layer"]: [_signal(r["layers"][i])[0] for r in observed]
                    for i, layer in enumerate(observed[0]["layers"])
                },
                floor=floor["value"],
                ci_low={
                    layer["layer"]: [_signal(r["layers"][i])[1] for r in observed]
                    for i, layer in enumerate(observed[0]["layers"])
                },
            )
            collapse["loss"] = "trainer validation loss" if key else "probe validation tokens"
        tokens = None
        if self._windows is not None:
            tokens = {
                split: {
                    "tokens": w.n_tokens,
                    "documents": int(len(np.unique(w.doc_ids))),
                    "budget": self.settings.ex_per_dim * self._model["d_model"],
                }
                for split, w in self._windows.items()
            }
        seconds = [r["seconds"] for r in self.records.values()]
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "mode": mode,
            "provenance": self._provenance,
            "run": run,
            "model": self._model,
            "corpus": corpus_info(self.corpus),
            "split_policy": self._policy,
            "settings": asdict(self.settings),
            "tokens": tokens,
            "checkpoints": [self.records[k] for k in sorted(self.records)],
            "loss_curve": loss_curve,
            "floor": floor,
            "cka": cka,
            "collapse": collapse,
            "timings_s": {
                "shared": round(self.shared_seconds, 3),
                "checkpoints": round(float(sum(seconds)), 3),
            },
        }


def _signal(row: dict[str, Any]) -> tuple[float, float]:
    """(pcorr, CI low) of a layer for collapse detection: an undefined statistic (a constant
    representation) carries no readable signal and counts as 0; a percentile interval from few
    documents can sit above its estimate, so its low end is capped there."""
    if row["pcorr"] is None:
        return 0.0, 0.0
    return row["pcorr"], min(row["ci95"][0], row["pcorr"])


def _head(windows: Windows, fraction: float) -> Windows:
    """The first ``fraction`` of the windows: a prefix, so shrunk checkpoints keep the
    tokens that full ones start with (CKA compares the same tokens)."""
    k = max(1, math.ceil(fraction * len(windows.input_ids)))
    return Windows(
        windows.input_ids[:k], windows.targets[:k], windows.valid[:k], windows.doc_ids[:k]
    )


def _base_record(step: int, meta: dict[str, Any] | None) -> dict[str, Any]:
    meta = meta or {}
    return {
        "step": int(step),
        "tokens_seen": meta.get("tokens_seen"),
        "val_loss": meta.get("val_loss"),
    }


# ------------------------------------------------------------------------- post hoc


def loss_curve_from_metrics(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Train and validation loss per logged step, from a run's metrics.jsonl records."""
    return [
        {"step": r["step"], "loss": r.get("loss"), "val_loss": r.get("val_loss")}
        for r in records
        if r.get("loss") is not None or r.get("val_loss") is not None
    ]


def run_summary(run_dir: Path) -> dict[str, Any]:
    """What a trajectory records about its run: directory, configs, size, baseline."""
    run = RunDir(run_dir).read_run()
    return {
        "path": str(run_dir.resolve()),
        "model_config": run.get("model_config"),
        "model_config_hash": run.get("model_config_hash"),
        "train_config": run.get("train_config"),
        "n_params": run.get("n_params"),
        "unigram_baseline_loss": run.get("unigram_baseline_loss"),
    }


def run_corpus(run_dir: Path) -> Corpus:
    """The corpus a run was trained on, loaded as it was (same spec and size cap)."""
    train_config = RunDir(run_dir).read_run().get("train_config", {})
    return load_corpus(
        train_config.get("corpus", "stdlib"), max_chars=train_config.get("max_chars")
    )


def observe_run(
    run_dir: str | Path,
    *,
    corpus: str | Corpus | None = None,
    settings: TrajectorySettings | None = None,
    out_dir: str | Path | None = None,
    device: str = "cpu",
    steps: list[int] | None = None,
    progress: bool = True,
    reuse: bool = True,
    log: Callable[[str], None] = lambda _msg: None,
) -> dict[str, Any]:
    """Observe every checkpoint of an nnobs run (or ``steps``) and write the trajectory.

    Writes ``out_dir/trajectory.json`` (default ``RUN/trajectory``). With ``reuse``, an
    existing result for the same checkpoints and settings is returned as it is.
    """
    from nnobs.core.results import load_result, to_plain, write_result
    from nnobs.core.rundir import list_checkpoints, read_metrics
    from nnobs.models.adapter import nnobs_adapter
    from nnobs.models.checkpoint import load_checkpoint

    run_dir = Path(run_dir)
    if not RunDir(run_dir).is_run():
        raise NnobsError(f"{str(run_dir)!r} is not an nnobs run directory (no run.json)")
    settings = settings or TrajectorySettings()
    out = Path(out_dir) if out_dir is not None else RunDir(run_dir).trajectory_dir
    found = list_checkpoints(run_dir)
    if steps is not None:
        missing = sorted(set(steps) - {s for s, _ in found})
        if missing:
            raise NnobsError(f"run {str(run_dir)!r} has no checkpoint at step(s) {missing}")
        found = [(s, p) for s, p in found if s in steps]
    if not found:
        raise NnobsError(f"run {str(run_dir)!r} has no complete checkpoint: train it first")
    wanted = [s for s, _ in found]
    if reuse and (out / "trajectory.json").is_file():
        try:
            previous = load_result(out / "trajectory.json")
        except NnobsError:
            previous = None
        if (
            previous is not None
            and previous["settings"] == to_plain(asdict(settings))
            and [r["step"] for r in previous["checkpoints"]] == wanted
            # live results may have skipped or shrunk checkpoints; a failure would recur
            and all(r["status"] in ("observed", "failed") for r in previous["checkpoints"])
        ):
            log(f"{out / 'trajectory.json'} is up to date")
            return previous

    if isinstance(corpus, str):
        corpus = load_corpus(corpus)
    corpus = corpus or run_corpus(run_dir)
    with TrajectoryObserver(corpus, settings, progress=progress, log=log) as observer:
        adapter = None
        for step, path in found:
            loaded = load_checkpoint(path)
            adapter = nnobs_adapter(loaded.model.to(device), loaded.tokenizer, loaded.provenance())
            log(f"step {step}")
            observer.observe(adapter, step, meta=loaded.meta)
        if 0 not in observer.records:
            observer.observe_random_init(adapter)
        doc = observer.document(
            loss_curve_from_metrics(read_metrics(run_dir)),
            mode="post_hoc",
            run=run_summary(run_dir),
        )
    doc = to_plain(doc)
    write_result(out / "trajectory.json", doc)
    return doc
