"""Dense vs sparse circuit size at matched pretraining loss (Gao et al. 2025's headline).

The two models are matched on validation loss: the sparse run's checkpoint (the last, or a
chosen step) against the dense run's checkpoint whose validation loss is closest to it (or a
pinned step); both losses and their gap are reported. Every task is pruned on both models to
the same target loss (:func:`~nnobs.circuits.sizes.circuit_sizes`), and the headline is the
geometric mean over tasks of the edge ratio dense/sparse, ``exp(mean_t log r_t)`` with
``r_t = (edges_dense + 1) / (edges_sparse + 1)`` (the +1 keeps an empty circuit finite),
over the tasks both models reach; a task either model cannot do to the target is listed
and left out, with the count stated.

Its interval is a percentile bootstrap over tasks (tasks are the unit of replication). The
verdict "sparse circuits are smaller" is an exact one-sided Wilcoxon signed-rank test of
the per-task log ratios against a null symmetric about 0 (ratio 1), at ``level``: exact at
the ~20 tasks there are, where bootstrap tests run anticonservative, and unlike the sign
test it weighs how much smaller, not only which; a single extreme task cannot carry it. Its
calibration (null ≈ nominal rate, planted ratio found) is tested on simulated sizes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nnobs.circuits.sizes import check_tasks, checkpoint_info, circuit_sizes, pruner_settings
from nnobs.core.errors import NnobsError
from nnobs.core.results import software_provenance
from nnobs.core.rundir import list_checkpoints, read_meta, read_metrics
from nnobs.measure.stats import bootstrap_ci

SCHEMA = "nnobs.circuits_compare"
SCHEMA_VERSION = 1
TEST = (
    "one-sided Wilcoxon signed-rank over per-task log edge ratios, H0 ratio 1 (exact without ties)"
)
MODELS = ("dense", "sparse")


def checkpoint_val_losses(run: str | Path) -> list[tuple[int, float]]:
    """``(step, validation loss)`` of every complete checkpoint of ``run`` that has one: the
    loss logged in metrics.jsonl at that step, else the one in the checkpoint's metadata."""
    logged = {r["step"]: r["val_loss"] for r in read_metrics(run) if r.get("val_loss") is not None}
    found = []
    for step, path in list_checkpoints(run):
        loss = logged.get(step, read_meta(path).get("val_loss"))
        if loss is not None:
            found.append((step, float(loss)))
    return found


def match_checkpoint(
    run: str | Path, target: float, step: int | None = None
) -> tuple[int, float, list[tuple[int, float]]]:
    """The checkpoint of ``run`` whose validation loss is closest to ``target`` (the earlier
    of a tie), or the pinned ``step``: its step, its loss, and every candidate."""
    candidates = checkpoint_val_losses(run)
    if not candidates:
        raise NnobsError(
            f"run {str(run)!r} has no checkpoint with a validation loss to match on: train it "
            "with eval_every set, or pin the step"
        )
    if step is None:
        chosen = min(candidates, key=lambda c: (abs(c[1] - target), c[0]))
        return chosen[0], chosen[1], candidates
    losses = dict(candidates)
    if step not in losses:
        steps = ", ".join(str(s) for s, _ in candidates)
        raise NnobsError(
            f"run {str(run)!r} has no checkpoint with a validation loss at step {step}: "
            f"it has {steps}"
        )
    return step, losses[step], candidates


def log_ratios(dense_edges: Sequence[int], sparse_edges: Sequence[int]) -> np.ndarray:
    """Per-task ``log((dense + 1) / (sparse + 1))``: positive where the sparse circuit is
    smaller."""
    d = np.asarray(dense_edges, dtype=np.float64)
    s = np.asarray(sparse_edges, dtype=np.float64)
    if d.shape != s.shape or (d < 0).any() or (s < 0).any():
        raise NnobsError("edge counts must be non-negative, one per task for both models")
    return np.log1p(d) - np.log1p(s)


def sparse_smaller_p(logs: np.ndarray) -> np.ndarray | float:
    """One-sided Wilcoxon signed-rank p-value of ratio > 1 from per-task log ratios (the last
    axis; zeros dropped, as ties of the two models say nothing of the direction); 1 where no
    task differs."""
    from scipy.stats import wilcoxon

    logs = np.asarray(logs, dtype=np.float64)
    differs = (logs != 0).any(axis=-1)
    safe = np.where(differs[..., None], logs, 1.0)  # a placeholder row where none differs
    p = np.where(differs, wilcoxon(safe, axis=-1, alternative="greater").pvalue, 1.0)
    return float(p) if p.ndim == 0 else p


def ratio_test(
    logs: np.ndarray, *, level: float = 0.05, n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """The geometric-mean ratio ``exp(mean logs)``, its bootstrap interval over tasks, and
    the one-sided Wilcoxon signed-rank test of ratio > 1 at ``level``."""
    logs = np.asarray(logs, dtype=np.float64)
    if not 0 < level < 1:
        raise NnobsError(f"the test level must be in (0, 1), got {level}")
    out: dict[str, Any] = {"test": TEST, "level": level, "n_tasks": len(logs), "ratio": None,
                           "ci95": [None, None], "p_value": None, "n_sparse_smaller": 0,
                           "n_dense_smaller": 0, "verdict": "no task reached by both"}  # fmt: skip
    if len(logs) == 0:
        return out
    out["ratio"] = math.exp(float(logs.mean()))
    if len(logs) > 1:
        lo, hi = bootstrap_ci(np.mean, logs, n_boot=n_boot, seed=seed)
        out["ci95"] = [math.exp(lo), math.exp(hi)]
    out["n_sparse_smaller"] = int((logs > 0).sum())
    out["n_dense_smaller"] = int((logs < 0).sum())
    out["p_value"] = sparse_smaller_p(logs)
    # The exact test's smallest p with n differing tasks is 2^-n: below 5 tasks (at 0.05) no
    # ratio, however large, can be called, and the statement says so.
    out["min_p"] = 0.5 ** int((logs != 0).sum())
    smaller = out["p_value"] < level
    out["verdict"] = "sparse circuits smaller" if smaller else "not shown smaller"
    return out


def _tokenizers_match(dense: dict, sparse: dict) -> None:
    for key in ("tokenizer", "vocab_size"):
        if dense[key] != sparse[key]:
            raise NnobsError(
                f"the dense and sparse runs use different {key.replace('_', ' ')}s "
                f"({dense[key]} vs {sparse[key]}): compare models trained with the same "
                "tokenizer (the dense and sparse presets share one)"
            )


def matched_models(
    dense_run: str | Path, sparse_run: str | Path, dense_step: int | None, sparse_step: int | None
) -> tuple[dict, dict, dict]:
    """Both checkpoints' metadata and the matching: the sparse checkpoint, and the dense one
    closest to it in validation loss (or pinned). Refuses different tokenizers."""
    sparse = checkpoint_info(sparse_run, sparse_step)
    logged = dict(checkpoint_val_losses(sparse_run))  # as the dense candidates are read
    sparse["val_loss"] = logged.get(sparse["step"], sparse["val_loss"])
    if sparse["val_loss"] is None:
        raise NnobsError(
            f"the sparse checkpoint at step {sparse['step']} has no validation loss to match on"
        )
    step, loss, candidates = match_checkpoint(dense_run, sparse["val_loss"], dense_step)
    dense = checkpoint_info(dense_run, step)
    dense["val_loss"] = loss
    _tokenizers_match(dense, sparse)
    matching = {
        "how": "pinned" if dense_step is not None else "closest validation loss",
        "loss_gap": loss - sparse["val_loss"],
        "dense_candidates": [[s, v] for s, v in candidates],
    }
    return dense, sparse, matching


def task_rows(dense: dict, sparse: dict) -> list[dict]:
    """One row per task: both models' records and the log ratio where both reached."""
    rows = []
    for name, d in dense["tasks"].items():
        s = sparse["tasks"][name]
        both = d["reached"] and s["reached"]
        ratio = float(log_ratios([d["edges"]], [s["edges"]])[0]) if both else None
        rows.append({"task": name, "dense": d, "sparse": s, "log_ratio": ratio})
    return rows


def compare_circuits(
    dense_run: str | Path,
    sparse_run: str | Path,
    out: str | Path,
    tasks: Sequence[str],
    *,
    target_loss: float = 0.15,
    dense_step: int | None = None,
    sparse_step: int | None = None,
    pruner: dict | None = None,
    n_train: int = 512,
    n_heldout: int = 128,
    level: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """The comparison document (schema ``nnobs.circuits_compare``): both models matched on
    validation loss, every task's sizes on both (kept under ``out/sizes/{dense,sparse}``,
    resumable), and the headline ratio with its interval and test."""
    start = time.perf_counter()
    names = check_tasks(tasks)
    settings = pruner_settings(target_loss, pruner)
    dense_info, sparse_info, matching = matched_models(
        dense_run, sparse_run, dense_step, sparse_step
    )
    runs = {"dense": (dense_run, dense_info), "sparse": (sparse_run, sparse_info)}
    measured = {
        label: circuit_sizes(run, names, Path(out) / "sizes" / label, target_loss=target_loss,
                             step=info["step"], pruner=pruner, n_train=n_train,
                             n_heldout=n_heldout, device=device, progress=progress)
        for label, (run, info) in runs.items()
    }  # fmt: skip
    rows = task_rows(measured["dense"], measured["sparse"])
    logs = np.array([r["log_ratio"] for r in rows if r["log_ratio"] is not None])
    headline = ratio_test(logs, level=level, n_boot=n_boot, seed=seed)
    models = {
        label: {"run": str(Path(run).resolve()), **measured[label]["model"],
                "geomean_edges": measured[label]["geomean_edges"],
                "not_reached": measured[label]["not_reached"]}
        for label, (run, _) in runs.items()
    }  # fmt: skip
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "kind": "circuits_compare",
        "provenance": software_provenance(),
        "settings": {
            "tasks": names,
            "target_loss": target_loss,
            "pruner": settings,
            "n_train": n_train,
            "n_heldout": n_heldout,
            "level": level,
            "n_boot": n_boot,
            "seed": seed,
        },  # fmt: skip
        "matching": matching,
        "models": models,
        "tasks": rows,
        "excluded": [r["task"] for r in rows if r["log_ratio"] is None],
        "headline": {**headline, "statement": statement(headline, len(rows), models)},
        "pruning_seconds": sum(r[m]["seconds"] for r in rows for m in MODELS),
        "seconds": round(time.perf_counter() - start, 1),
    }


def statement(headline: dict, n_tasks: int, models: dict) -> str:
    """The headline in one sentence, with the test, the excluded count and both losses."""
    losses = (
        f"validation loss dense {models['dense']['val_loss']:.3f} (step "
        f"{models['dense']['step']}), sparse {models['sparse']['val_loss']:.3f} (step "
        f"{models['sparse']['step']})"
    )
    n = headline["n_tasks"]
    excluded = f"{n_tasks - n} of {n_tasks} tasks excluded (not reached by a model)"
    if headline["ratio"] is None:
        return f"no task reached by both models; {excluded}; {losses}"
    lo, hi = headline["ci95"]
    interval = "" if lo is None else f" (95% CI {lo:.2f}-{hi:.2f} over tasks)"
    untestable = (
        f", too few tasks: its smallest p is {headline['min_p']:.3g}"
        if headline["min_p"] >= headline["level"]
        else ""
    )
    return (
        f"dense/sparse circuit edges: geometric-mean ratio {headline['ratio']:.2f}x"
        f"{interval} over {n} tasks; {headline['verdict']} (Wilcoxon one-sided p = "
        f"{headline['p_value']:.3g}, level {headline['level']}{untestable}); {excluded}; "
        f"{losses}"
    )
