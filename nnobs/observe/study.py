"""Controlled architecture studies: which variants keep the decision-quality signal in training.

A study trains every architecture variant with every training seed, observes every checkpoint
of every run (:func:`nnobs.observe.trajectory.observe_run`) and writes one ``study.json`` (schema
``nnobs.study``) that holds, per variant, each seed's trajectory numbers, the final pcorr with a
confidence interval across seeds, the collapse verdicts, and the effect against the baseline.

**Controls.** Variants are matched in parameter count to the baseline variant (one width is
adjusted by :func:`nnobs.models.config.match_params`: ``match_params_by = "d_mlp"`` or
``"d_model"``; ``"none"`` where the parameter count is the variable studied, as in
over-parameterisation). Every run sees the same tokens in the same order: the data order is
fixed by the study's ``data_seed`` (``TrainConfig.data_seed``) and the training seed varies
only the initialisation, so seed-to-seed spread is initialisation variance and a difference
between variants is not a difference in data.

**Statistics.** A run's value is the final checkpoint's pcorr at its best layer on the test
split (the ensemble of probe seeds: their standardised scores averaged). Across training seeds
a variant reports the mean and a 95% t-interval (df = seeds − 1: honest, and wide with few
seeds); the effect of a variant is its mean minus the baseline's with a Welch 95% interval.
Seeds are the unit of replication: token-level bootstrap intervals (in each trajectory)
describe one run only.

**Config** (TOML): ``[study]`` (name, description, question, baseline, seeds, data_seed,
match_params_by), ``[model]`` and ``[train]`` (the base run, as in ``nnobs train``),
``[observe]`` (:class:`~nnobs.observe.trajectory.TrajectorySettings` fields) and ``[[variants]]``
(name, description, ``model = {knob = value}`` overrides, optional ``match_params_by``).

**Layout.** ``OUT/study.json``, ``OUT/config.json`` (the resolved study) and
``OUT/runs/<variant>/seed_<k>/`` (a run directory with ``trajectory/trajectory.json``).
Runs go to ``jobs`` worker processes; re-running the same study resumes: finished runs and
trajectories are reused, interrupted runs resume from their last checkpoint.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import time
import tomllib
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from nnobs.core.errors import NnobsError
from nnobs.core.files import write_json
from nnobs.core.rundir import RunDir
from nnobs.models.config import ModelConfig
from nnobs.models.sizing import count_params, match_params
from nnobs.observe.trajectory import OBSERVED, TrajectorySettings
from nnobs.training.config import TrainConfig

SCHEMA = "nnobs.study"
SCHEMA_VERSION = 1
STUDY_DIR = Path(__file__).parent / "studies"
MATCH_KNOBS = ("d_mlp", "d_model", "none")
SECTIONS = ("study", "model", "train", "observe", "variants")


@dataclass
class Variant:
    name: str
    model: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    match_params_by: str | None = None  # None: the study's setting


@dataclass
class StudyConfig:
    """A resolved study: the base run, the variants and how they are compared."""

    name: str
    model: ModelConfig
    train: TrainConfig
    observe: TrajectorySettings
    variants: list[Variant]
    baseline: str
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    data_seed: int = 0
    match_params_by: str = "d_mlp"
    description: str = ""
    question: str = ""

    def __post_init__(self) -> None:
        names = [v.name for v in self.variants]
        if len(names) < 2:
            raise NnobsError("a study needs at least two [[variants]] to compare")
        if len(set(names)) != len(names):
            raise NnobsError(f"variant names must be unique, got {names}")
        bad = [n for n in names if not n or "/" in n or n.startswith(".")]
        if bad:
            raise NnobsError(f"variant names are directory names: {bad} will not do")
        if self.baseline not in names:
            raise NnobsError(f"baseline {self.baseline!r} is not a variant: choose one of {names}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise NnobsError(f"seeds must be distinct integers, got {self.seeds}")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise NnobsError(f"seeds must be integers >= 0, got {self.seeds}")
        for knob in [self.match_params_by, *(v.match_params_by for v in self.variants)]:
            if knob is not None and knob not in MATCH_KNOBS:
                raise NnobsError(
                    f"match_params_by {knob!r}: choose one of {', '.join(MATCH_KNOBS)}"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "question": self.question,
            "baseline": self.baseline,
            "seeds": list(self.seeds),
            "data_seed": self.data_seed,
            "match_params_by": self.match_params_by,
            "model": self.model.to_dict(),
            "train": self.train.to_dict(),
            "observe": asdict(self.observe),
            "variants": [asdict(v) for v in self.variants],
        }


# ------------------------------------------------------------------------------ config


def study_preset_names() -> list[str]:
    return sorted(p.stem for p in STUDY_DIR.glob("*.toml"))


def study_preset_path(name: str) -> Path:
    path = STUDY_DIR / f"{name}.toml"
    if not path.is_file():
        raise NnobsError(
            f"unknown study preset {name!r}: choose one of {', '.join(study_preset_names())}"
        )
    return path


def parse_study(tables: dict[str, Any], source: str = "study config") -> StudyConfig:
    """Build a :class:`StudyConfig` from parsed TOML tables; every mistake is one NnobsError."""
    unknown = sorted(set(tables) - set(SECTIONS))
    if unknown:
        raise NnobsError(
            f"{source} has unexpected top-level entries {unknown}: a study holds "
            "[study], [model], [train], [observe] and [[variants]]"
        )
    study = dict(tables.get("study", {}))
    raw_variants = tables.get("variants")
    if not isinstance(raw_variants, list) or not raw_variants:
        raise NnobsError(f"{source} has no [[variants]]: add at least two")
    variants = []
    for i, raw in enumerate(raw_variants):
        if not isinstance(raw, dict) or "name" not in raw:
            raise NnobsError(f"variant {i} in {source} has no name")
        extra = sorted(set(raw) - {f.name for f in dataclasses.fields(Variant)})
        if extra:
            raise NnobsError(
                f"variant {raw['name']!r} has unknown entries {extra}: a variant has name, "
                "description, model (a table of model knobs) and match_params_by"
            )
        variants.append(Variant(**raw))
    known = {f.name for f in dataclasses.fields(StudyConfig)} - {
        "model",
        "train",
        "observe",
        "variants",
    }
    extra = sorted(set(study) - known)
    if extra:
        raise NnobsError(
            f"[study] in {source} has unknown entries {extra}: known are {sorted(known)}"
        )
    try:
        model = ModelConfig.from_dict(dict(tables.get("model", {})))
        train = TrainConfig.from_dict(dict(tables.get("train", {})))
        observe = TrajectorySettings.from_dict(dict(tables.get("observe", {})))
        for v in variants:  # every variant must be a valid architecture on its own
            model.replace(**v.model)
        return StudyConfig(
            model=model,
            train=train,
            observe=observe,
            variants=variants,
            name=study.pop("name", source),
            baseline=study.pop("baseline", variants[0].name),
            **study,
        )
    except TypeError as e:
        raise NnobsError(f"invalid value in {source}: {e}") from e


def load_study_config(preset: str | None = None, config: str | os.PathLike | None = None):
    """A study from a shipped preset or a TOML file."""
    if preset is not None and config is not None:
        raise NnobsError("give a study preset or a config file, not both")
    path = Path(config) if config is not None else study_preset_path(preset or "quick")
    try:
        tables = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise NnobsError(f"study config {str(path)!r} does not exist") from e
    except (OSError, UnicodeDecodeError) as e:
        raise NnobsError(f"study config {str(path)!r} cannot be read ({e})") from e
    except tomllib.TOMLDecodeError as e:
        raise NnobsError(f"study config {str(path)!r} is not valid TOML: {e}") from e
    tables.setdefault("study", {}).setdefault("name", path.stem)
    return parse_study(tables, str(path))


def variant_configs(cfg: StudyConfig) -> dict[str, ModelConfig]:
    """Each variant's architecture, matched in parameters to the baseline where asked."""
    by_name = {v.name: v for v in cfg.variants}
    baseline = cfg.model.replace(**by_name[cfg.baseline].model)
    target = count_params(baseline)
    out = {}
    for v in cfg.variants:
        config = cfg.model.replace(**v.model)
        knob = v.match_params_by or cfg.match_params_by
        if v.name != cfg.baseline and knob != "none" and count_params(config) != target:
            config = match_params(config, target, knob=knob)
        out[v.name] = config
    return out


# -------------------------------------------------------------------------------- runs


@dataclass
class Unit:
    """One training run of a study: a variant at a training seed."""

    variant: str
    seed: int
    run_dir: Path
    model: ModelConfig
    train: TrainConfig
    observe: TrajectorySettings


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_unit(unit: Unit) -> dict[str, Any]:
    """Train (or resume, or find finished) one run, then observe its checkpoints."""
    from nnobs.observe.trajectory import observe_run
    from nnobs.training.trainer import train

    start = time.perf_counter()
    result = train(unit.model, unit.train, unit.run_dir, progress=False)
    trained = time.perf_counter()
    observe_run(unit.run_dir, settings=unit.observe, progress=False)
    if result.already_complete:
        status = "complete"
    else:
        status = "resumed" if result.resumed_from is not None else "trained"
    return {
        "variant": unit.variant,
        "seed": unit.seed,
        "status": status,
        "train_seconds": round(trained - start, 3),
        "observe_seconds": round(time.perf_counter() - trained, 3),
    }


def _warm_caches(cfg: StudyConfig) -> None:
    """Tokenizer and token caches built once here, not raced for by every worker."""
    from nnobs.data.corpus import load_corpus
    from nnobs.data.encoding import token_stream
    from nnobs.data.tokenizer import get_tokenizer

    corpus = load_corpus(cfg.train.corpus, max_chars=cfg.train.max_chars)
    vocab = max(c.vocab_size for c in variant_configs(cfg).values())
    tokenizer = get_tokenizer(cfg.train.tokenizer, corpus, vocab)
    for split in (corpus.train, corpus.validation):
        token_stream(split, tokenizer)


def run_study(
    cfg: StudyConfig,
    out_dir: str | Path,
    *,
    jobs: int = 1,
    log: Callable[[str], None] = lambda _msg: None,
) -> dict[str, Any]:
    """Run (or resume) every variant × seed, observe them, and write ``OUT/study.json``."""
    from nnobs.core.results import write_result

    if jobs < 1:
        raise NnobsError(f"jobs must be a positive integer, got {jobs}")
    out = Path(out_dir)
    configs = variant_configs(cfg)
    previous = out / "config.json"
    if previous.is_file():
        from nnobs.core.files import read_json

        if read_json(previous, "study config") != _plain(cfg.to_dict()):
            raise NnobsError(f"{str(out)!r} holds a different study; use a new --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    write_json(previous, _plain(cfg.to_dict()))
    units = [
        Unit(
            v.name,
            seed,
            out / "runs" / v.name / f"seed_{seed}",
            configs[v.name],
            cfg.train.replace(seed=seed, data_seed=cfg.data_seed),
            cfg.observe,
        )
        for v in cfg.variants
        for seed in cfg.seeds
    ]
    start = time.perf_counter()
    log(f"study {cfg.name}: {len(cfg.variants)} variants × {len(cfg.seeds)} seeds, {jobs} job(s)")
    _warm_caches(cfg)
    outcomes, failures = {}, []

    def done(unit: Unit, outcome: dict | None, error: BaseException | None) -> None:
        what = f"{unit.variant} seed {unit.seed}"
        if error is not None:
            failures.append(f"{what}: {error}")
        else:
            outcomes[(unit.variant, unit.seed)] = outcome
        count = f"[{len(outcomes) + len(failures)}/{len(units)}]"
        if error is not None:
            log(f"{count} {what} failed: {error}")
        else:
            log(
                f"{count} {what}: {outcome['status']}, train {outcome['train_seconds']:.0f} s, "
                f"observe {outcome['observe_seconds']:.0f} s"
            )

    if jobs == 1:
        for unit in units:
            try:
                done(unit, run_unit(unit), None)
            except NnobsError as e:
                done(unit, None, e)
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=jobs,
            mp_context=context,
            initializer=_init_worker,
            initargs=(max(1, (os.cpu_count() or 1) // jobs),),
        ) as pool:
            futures = {pool.submit(run_unit, unit): unit for unit in units}
            for future in concurrent.futures.as_completed(futures):
                error = future.exception()
                if error is not None and not isinstance(error, NnobsError):
                    raise error
                done(futures[future], None if error else future.result(), error)
    if failures:
        raise NnobsError(
            f"{len(failures)} of {len(units)} runs failed ({'; '.join(failures)}); the others "
            "are kept: fix the cause and re-run the same command to resume"
        )
    doc = assemble(cfg, out, configs, outcomes, time.perf_counter() - start)
    write_result(out / "study.json", doc)
    return doc


def _plain(obj: Any) -> Any:
    from nnobs.core.results import to_plain

    return to_plain(obj)


# -------------------------------------------------------------------------- statistics


def t_interval(values: list[float], confidence: float = 0.95) -> list[float] | None:
    """Mean ± t-quantile × standard error; None with fewer than two values."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if len(v) < 2:
        return None
    half = scipy_stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return [float(v.mean() - half), float(v.mean() + half)]


def welch_interval(a: list[float], b: list[float], confidence: float = 0.95) -> list[float] | None:
    """Interval for mean(a) − mean(b) with Welch's degrees of freedom."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff, se = a.mean() - b.mean(), np.sqrt(va + vb)
    if se == 0:
        return [float(diff), float(diff)]
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = scipy_stats.t.ppf(0.5 + confidence / 2, df) * se
    return [float(diff - half), float(diff + half)]


def _mean(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def run_entry(seed: int, run_dir: Path, study_dir: Path, doc: dict, outcome: dict) -> dict:
    """One run's numbers for the study: its trajectory condensed, final and peak values."""
    observed = [r for r in doc["checkpoints"] if r["status"] in OBSERVED]
    final = observed[-1]
    by_step = {r["step"]: r for r in observed}
    steps = [r["step"] for r in doc["checkpoints"]]

    def series(fn) -> list:
        return [fn(by_step[s]) if s in by_step else None for s in steps]

    collapse = doc.get("collapse") or {}
    return {
        "seed": seed,
        "run_dir": str(run_dir.relative_to(study_dir)),
        "status": outcome["status"],
        "train_seconds": outcome["train_seconds"],
        "observe_seconds": outcome["observe_seconds"],
        "steps": steps,
        "val_loss": [r["val_loss"] for r in doc["checkpoints"]],
        "best_pcorr": series(lambda r: r["best"]["ensemble"]),
        "best_layer": series(lambda r: r["best"]["layer"]),
        "best_ci95": series(lambda r: r["best"]["ensemble_ci95"]),
        "oc_pcorr": series(lambda r: r["output_controlled"]["ensemble"]),
        "layer_pcorr": series(lambda r: [x["pcorr"] for x in r["layers"]]),
        "cka_to_final": series(lambda r: r.get("cka_to_final")),
        "attributes": series(lambda r: r.get("attributes")),
        "final": {
            "step": final["step"],
            "pcorr": final["best"]["ensemble"],
            "ci95": final["best"]["ensemble_ci95"],
            "layer": final["best"]["layer"],
            "oc_pcorr": final["output_controlled"]["ensemble"],
            "val_loss": final["val_loss"],
        },
        "peak_pcorr": max(r["best"]["ensemble"] for r in observed),
        "unigram_loss": (doc.get("run") or {}).get("unigram_baseline_loss"),
        "floor": (doc.get("floor") or {}).get("value"),
        "collapse": {
            k: collapse.get(k) for k in ("verdict", "reason", "layer", "collapse_step", "peak_step")
        },
    }


def _mean_series(rows: list[list]) -> list:
    """Element-wise mean over seeds of equally long series (nested lists allowed)."""
    out = []
    for items in zip(*rows, strict=True):
        kept = [x for x in items if x is not None]
        if not kept:
            out.append(None)
        elif isinstance(kept[0], list):  # per-layer values; a missing one is NaN → null
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a layer missing everywhere
                out.append(np.nanmean(np.asarray(kept, dtype=float), axis=0).tolist())
        else:
            out.append(float(np.mean(kept)))
    return out


def _mean_attributes(rows: list[list]) -> dict | None:
    """attribute → statistic → per step, the per-layer values averaged over seeds."""
    first = next((a for row in rows for a in row if a), None)
    if first is None:
        return None
    return {
        attr: {
            stat: _mean_series([[(a or {}).get(attr, {}).get(stat) for a in row] for row in rows])
            for stat in stats
        }
        for attr, stats in first.items()
    }


def variant_summary(name: str, runs: list[dict], config: ModelConfig, variant: Variant) -> dict:
    finals = [r["final"]["pcorr"] for r in runs]
    verdicts = [r["collapse"]["verdict"] for r in runs]
    counts = {v: verdicts.count(v) for v in dict.fromkeys(verdicts)}
    top = max(counts, key=counts.get)
    verdict = top if counts[top] * 2 > len(runs) else "mixed"
    per_step = list(zip(*[r["best_pcorr"] for r in runs], strict=True))
    return {
        "name": name,
        "description": variant.description,
        "overrides": variant.model,
        "model_config": config.to_dict(),
        "n_params": count_params(config),
        "runs": runs,
        "final_pcorr": {
            "mean": _mean(finals),
            "std": float(np.std(finals, ddof=1)) if len(finals) > 1 else None,
            "ci95": t_interval(finals),
            "per_seed": finals,
        },
        "final_oc_pcorr": {
            "mean": _mean([r["final"]["oc_pcorr"] for r in runs]),
            "ci95": t_interval([r["final"]["oc_pcorr"] for r in runs]),
        },
        "peak_pcorr": {
            "mean": _mean([r["peak_pcorr"] for r in runs]),
            "ci95": t_interval([r["peak_pcorr"] for r in runs]),
        },
        "final_val_loss": {
            "mean": _mean([r["final"]["val_loss"] for r in runs]),
            "ci95": t_interval([r["final"]["val_loss"] for r in runs]),
        },
        "floor": _mean([r["floor"] for r in runs]),
        "unigram_loss": _mean([r["unigram_loss"] for r in runs]),
        "verdict": verdict,
        "verdict_counts": counts,
        "aggregate": {
            "steps": runs[0]["steps"],
            "best_pcorr_mean": [_mean(list(v)) for v in per_step],
            "best_pcorr_ci95": [t_interval(list(v)) for v in per_step],
            "val_loss_mean": _mean_series([r["val_loss"] for r in runs]),
            "oc_pcorr_mean": _mean_series([r["oc_pcorr"] for r in runs]),
            "layer_pcorr_mean": _mean_series([r["layer_pcorr"] for r in runs]),
            "cka_to_final_mean": _mean_series([r["cka_to_final"] for r in runs]),
            "attributes_mean": _mean_attributes([r["attributes"] for r in runs]),
        },
    }


def effects(variants: list[dict], baseline: str) -> list[dict]:
    """Each variant against the baseline: differences of means with Welch 95% intervals."""
    base = next(v for v in variants if v["name"] == baseline)
    out = []
    for v in variants:
        if v["name"] == baseline:
            continue
        for metric, key in (
            ("final_pcorr", lambda r: r["final"]["pcorr"]),
            ("final_oc_pcorr", lambda r: r["final"]["oc_pcorr"]),
            ("peak_pcorr", lambda r: r["peak_pcorr"]),
            ("final_val_loss", lambda r: r["final"]["val_loss"]),
        ):
            a = [key(r) for r in v["runs"]]
            b = [key(r) for r in base["runs"]]
            interval = welch_interval(a, b)
            out.append(
                {
                    "variant": v["name"],
                    "baseline": baseline,
                    "metric": metric,
                    "difference": float(np.mean(a) - np.mean(b)),
                    "ci95": interval,
                    "excludes_zero": None
                    if interval is None
                    else bool(interval[0] > 0 or interval[1] < 0),
                }
            )
    return out


def assemble(
    cfg: StudyConfig,
    out: Path,
    configs: dict[str, ModelConfig],
    outcomes: dict[tuple[str, int], dict],
    seconds: float,
) -> dict[str, Any]:
    """The study result from its runs' trajectories (plain data, schema ``nnobs.study``)."""
    from nnobs.core.results import load_result

    variants = []
    for v in cfg.variants:
        runs = []
        for seed in cfg.seeds:
            run_dir = out / "runs" / v.name / f"seed_{seed}"
            doc = load_result(RunDir(run_dir).trajectory_file)
            runs.append(run_entry(seed, run_dir, out, doc, outcomes[(v.name, seed)]))
        variants.append(variant_summary(v.name, runs, configs[v.name], v))
    return _plain(
        {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "name": cfg.name,
            "description": cfg.description,
            "question": cfg.question,
            "config": cfg.to_dict(),
            "controls": {
                "data_order": f"identical for every run (data_seed {cfg.data_seed})",
                "training_seeds": "vary the initialisation only",
                "parameter_matching": {
                    v.name: v.match_params_by or cfg.match_params_by for v in cfg.variants
                },
                "statistic": "final checkpoint, best layer, test split, probe-seed ensemble; "
                "95% t-interval across training seeds; effects: Welch 95% interval",
            },
            "baseline": cfg.baseline,
            "variants": variants,
            "effects": effects(variants, cfg.baseline),
            "wall_seconds": round(seconds, 1),
        }
    )
