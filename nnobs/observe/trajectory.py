"""Observability over training: the protocol's tracked subset at every checkpoint of a run.

Per checkpoint (DESIGN.md section 2, "Over training"):

- *layer profile*: the sweep probe (seed 42) at every layer, pcorr on the validation split
  with a cluster-bootstrap 95% CI (documents resampled);
- *best layer*: the top layer of that profile within ``max_depth_fraction`` of depth; probes
  for ``seeds`` (bootstrap resamples of the training documents), pcorr per seed on the test
  split, their ensemble with a CI, and seed agreement;
- *output-controlled residual*: the ensemble's pcorr with an MLP's loss prediction from the
  last layer as an extra covariate;
- *random heads* at the best layer (a baseline for the probe);
- optionally, attribute probes per layer (:mod:`nnobs.observe.attribute_probes`).

Once per run: the null (step 0 is the randomly initialised model, measured like every
checkpoint; a fresh initialisation when the run has no step 0) and its floor, linear CKA of
every layer to the same layer of the last checkpoint, the last checkpoint's layer × layer
CKA, and the collapse verdict: tests of each checkpoint against the null
(:mod:`nnobs.observe.collapse`).

Shared across checkpoints instead of repeated per ``nnobs observe`` call: loading the corpus,
the document splits, the tokenizer, the tokenisation and the token windows (every checkpoint
is measured on the same tokens, which is also what makes CKA across checkpoints meaningful),
and the floor. Probes are not warm-started: the probe's objective is convex and solved to its
optimum, so a warm start could only save a few solver iterations.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nnobs.core.errors import NnobsError
from nnobs.core.fields import from_fields
from nnobs.core.rundir import RunDir
from nnobs.data.corpus import Corpus, corpus_info, load_corpus
from nnobs.data.windows import Windows, held_out_splits
from nnobs.measure.probes import random_head_scores
from nnobs.models.adapter import ModelAdapter, provenance
from nnobs.models.devices import check_device
from nnobs.observe.attribute_probes import attribute_profile
from nnobs.observe.capture import capture_scratch
from nnobs.observe.settings import ObserveSettings
from nnobs.observe.signal import candidate_layers, fit_seed_probes, pcorr
from nnobs.observe.splits import (
    SplitData,
    capture_splits,
    final_site,
    layer_sites,
    model_trained_on,
    token_windows,
)
from nnobs.observe.stages import evaluate_on_test, layer_profile, output_control
from nnobs.observe.trajectory_summary import cka_to_final, collapse_verdict, random_init_floor

SCHEMA = "nnobs.trajectory"
SCHEMA_VERSION = 2
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
        return from_fields(cls, data, "observation setting")


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
        scratch = capture_scratch("nnobs-trajectory-")
        self.work = scratch.path
        # Removed on close() or, failing that, when the observer is garbage-collected.
        self._cleanup = weakref.finalize(self, scratch.close)
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

    def __exit__(self, *exc: object) -> None:
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
            adapter.context_length,
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
            self._windows = token_windows(
                adapter, self._docs, self.settings, self.settings.doc_tokens
            )
        except NnobsError:
            if self.settings.doc_tokens is None:
                raise
            # Too few documents to fill the budget at doc_tokens each: take whole documents.
            self._windows = token_windows(adapter, self._docs, self.settings)
            self._policy += "; too few documents for the doc_tokens cap, so none was applied"
        self._key = key
        self.shared_seconds += time.perf_counter() - start
        return self._windows

    def _capture(
        self,
        adapter: ModelAdapter,
        sites: list[str],
        fraction: float,
        splits: list[str] | None = None,
    ) -> dict[str, SplitData]:
        windows = self._prepare(adapter)
        splits = splits or list(windows)
        if fraction < 1:
            # A prefix, so shrunk checkpoints keep the tokens full ones start with (CKA
            # compares the same tokens).
            windows = {
                s: w.head(math.ceil(fraction * len(w.input_ids))) for s, w in windows.items()
            }
        n_tokens = sum(windows[s].n_tokens for s in splits)
        size = n_tokens * len(sites) * adapter.d_model * 2
        work_dir = None if size < _IN_MEMORY_BYTES else self.work / "capture"
        docs = {s: self._docs[s] for s in splits}
        return capture_splits(
            adapter, docs, sites, self.settings, work_dir, self.progress, windows=windows
        )

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
            self._keep_cka_sample(step, val, layer_sites(adapter, self.settings))
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
        sites = layer_sites(adapter, self.settings)
        last_site = final_site(adapter)
        try:
            data = self._capture(
                adapter, list(dict.fromkeys([*sites.values(), last_site])), fraction
            )
            train, val, test = data["train"], data["validation"], data["test"]
            record["tokens"] = {name: split.n for name, split in data.items()}
            record["capture_val_loss"] = float(np.mean(val.cap.loss))
            record["layers"] = layer_profile(train, val, sites, s, device)
            measured = [r for r in record["layers"] if r["pcorr"] is not None]
            layer = candidate_layers(measured, adapter.n_layers, s)[0]
            site = sites[layer]
            probes = fit_seed_probes(train, site, s.seeds, device, s.label)
            record["best"], _, score = evaluate_on_test(
                probes, test, layer, site, s, agreement=True
            )
            record["output_controlled"] = output_control(
                train, test, site, last_site, score, s.n_boot, device
            )
            X = test.acts(site)
            values = np.abs(pcorr(random_head_scores(X, s.random_heads), test, site))
            record["random_head"] = {
                "n": s.random_heads,
                "abs_q95": float(np.quantile(values, 0.95)),
                "abs_values": values.tolist(),
            }
            if s.attributes:
                record["attributes"] = attribute_profile(
                    adapter, self._docs, list(sites.values()), s
                )
        except NnobsError as err:
            record.update(status="failed", note=str(err))
            val = None
        record["seconds"] = round(time.perf_counter() - start, 3)
        return val

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
        """The detection floor (:func:`random_init_floor`) from the step-0 checkpoint, else
        from :meth:`observe_random_init`."""
        if 0 in self.records:
            init = {"source": "step 0 checkpoint", **self.records[0]}
        else:
            init = self.random_init
        return random_init_floor(init, self.settings.level)

    def observed(self) -> list[dict[str, Any]]:
        return [
            self.records[k] for k in sorted(self.records) if self.records[k]["status"] in OBSERVED
        ]

    def cka(self) -> dict[str, Any] | None:
        """CKA to the last observed step (:func:`cka_to_final`); fills ``cka_to_final`` in
        each observed record."""
        steps = [r["step"] for r in self.observed() if r["step"] in self._cka_files]
        found = cka_to_final({step: self._cka_files[step] for step in steps})
        if found is None:
            return None
        rows, matrix = found
        for step, row in rows.items():
            self.records[step]["cka_to_final"] = row
        return matrix

    def document(
        self, loss_curve: list[dict[str, Any]], *, mode: str, run: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The trajectory result so far (plain data, schema ``nnobs.trajectory``)."""
        floor = self.floor()
        cka = self.cka()
        observed = self.observed()
        collapse = None
        if floor is not None and len(observed) >= 2:
            collapse = collapse_verdict(observed, floor, self.settings.level)
        tokens = None
        if self._windows is not None:
            budget = self.settings.token_budget(self._model["d_model"])
            tokens = {
                split: {
                    "tokens": w.n_tokens,
                    "documents": int(len(np.unique(w.doc_ids))),
                    "budget": budget,
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

    check_device(device)
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
            previous = load_result(out / "trajectory.json", "nnobs.trajectory")
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
        result = observer.document(
            loss_curve_from_metrics(read_metrics(run_dir)),
            mode="post_hoc",
            run=run_summary(run_dir),
        )
    result = to_plain(result)
    write_result(out / "trajectory.json", result)
    return result
