"""A study's result: each run's trajectory condensed, each variant summarised across training
seeds (mean and 95% t-interval), and each variant's effect against the baseline (difference of
means with a Welch 95% interval). Schema ``nnobs.study``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from nnobs.core.errors import NnobsError
from nnobs.core.rundir import RunDir
from nnobs.models.config import ModelConfig
from nnobs.models.sizing import count_params
from nnobs.observe.study_config import StudyConfig, Variant, study_run_dir
from nnobs.observe.trajectory import OBSERVED

SCHEMA = "nnobs.study"
SCHEMA_VERSION = 1


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


def observed_checkpoints(trajectory: dict, run_dir: Path) -> list[dict]:
    """The measured checkpoints of a run's trajectory; a run with none cannot enter a study,
    which is one NnobsError with the first failure's reason."""
    observed = [r for r in trajectory["checkpoints"] if r["status"] in OBSERVED]
    if not observed:
        notes = [r["note"] for r in trajectory["checkpoints"] if r.get("note")]
        raise NnobsError(
            f"observation failed at every checkpoint of {str(run_dir)!r}"
            + (f" ({notes[0]})" if notes else "")
        )
    return observed


def run_entry(seed: int, run_dir: Path, study_dir: Path, trajectory: dict, outcome: dict) -> dict:
    """One run's numbers for the study: its trajectory condensed, final and peak values."""
    observed = observed_checkpoints(trajectory, run_dir)
    final = observed[-1]
    by_step = {r["step"]: r for r in observed}
    steps = [r["step"] for r in trajectory["checkpoints"]]

    def series(fn) -> list:
        return [fn(by_step[s]) if s in by_step else None for s in steps]

    collapse = trajectory.get("collapse") or {}
    return {
        "seed": seed,
        "run_dir": str(run_dir.relative_to(study_dir)),
        "status": outcome["status"],
        "train_seconds": outcome["train_seconds"],
        "observe_seconds": outcome["observe_seconds"],
        "steps": steps,
        "val_loss": [r["val_loss"] for r in trajectory["checkpoints"]],
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
        "unigram_loss": (trajectory.get("run") or {}).get("unigram_baseline_loss"),
        "floor": (trajectory.get("floor") or {}).get("value"),
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
    """A variant across its training seeds: final and peak values with intervals, the
    majority collapse verdict, and per-step means."""
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
    from nnobs.core.results import load_result, to_plain

    variants = []
    for v in cfg.variants:
        runs = []
        for seed in cfg.seeds:
            run_dir = study_run_dir(out, v.name, seed)
            trajectory = load_result(RunDir(run_dir).trajectory_file, "nnobs.trajectory")
            runs.append(run_entry(seed, run_dir, out, trajectory, outcomes[(v.name, seed)]))
        variants.append(variant_summary(v.name, runs, configs[v.name], v))
    return to_plain(
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
