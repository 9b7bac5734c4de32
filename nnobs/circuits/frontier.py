"""The capability–interpretability frontier (Gao et al. 2025): pretraining loss against circuit
size over a grid of total width × L0, and the paper's two claims tested.

Every grid point (:mod:`nnobs.circuits.frontier_config`) at every training seed is one unit:
train the model (the ordinary trainer, same tokens in the same order for every unit: the data
order is the frontier's ``data_seed``), score it per held-out document
(:mod:`nnobs.circuits.frontier_measure`), and prune a circuit for every task to the target
loss (:func:`nnobs.circuits.sizes.circuit_sizes`). The statistics are in
:mod:`nnobs.circuits.frontier_stats`.

**Tasks a model cannot reach.** A task whose full model misses the target loss has no circuit
at that loss; it is reported per model. Each point's geometric mean uses only the tasks
*every* model reaches (the common tasks), so every point's circuit size is a mean over the
same tasks; each comparison of two models uses the tasks both reach, so it stays paired.

**Layout.** ``OUT/config.json`` (the resolved frontier), ``OUT/runs/<point>/seed_<k>/`` (run
directories), ``OUT/measures/<point>/seed_<k>/`` (``loss.json`` and ``sizes/<task>.json``),
``OUT/frontier.json`` (schema ``nnobs.frontier``). Re-running the same command resumes:
finished runs, losses and circuit sizes are reused, interrupted runs continue from their last
checkpoint. Units go to ``jobs`` worker processes; the frontier directory has one writer at a
time (:func:`nnobs.core.lock.lock_directory`), and so has each run directory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nnobs.circuits.frontier_config import (
    FrontierConfig,
    GridPoint,
    matrix_params,
    measures_dir,
    run_dir,
)
from nnobs.circuits.frontier_stats import FrontierMeasures, claim_verdicts, pareto_optimal
from nnobs.core.errors import NnobsError
from nnobs.core.files import read_json, write_json
from nnobs.core.lock import lock_directory
from nnobs.core.results import software_provenance
from nnobs.core.workers import run_jobs
from nnobs.models.sizing import count_params

SCHEMA, SCHEMA_VERSION = "nnobs.frontier", 1


@dataclass
class Unit:
    """One model of the frontier: a grid point at a training seed, and how it is measured."""

    point: GridPoint
    seed: int
    run_dir: Path
    measures_dir: Path
    cfg: FrontierConfig
    device: str = "cpu"
    progress: bool = False  # progress bars (one unit at a time only: bars would interleave)


def run_unit(unit: Unit) -> dict[str, Any]:
    """Train (or resume, or find finished) one model, score it and size its circuits."""
    from nnobs.circuits.frontier_measure import document_losses
    from nnobs.circuits.sizes import circuit_sizes
    from nnobs.training.trainer import train

    cfg, tc = unit.cfg, unit.point.train.replace(seed=unit.seed)
    start = time.perf_counter()
    run = train(unit.point.model, tc, unit.run_dir, progress=unit.progress)
    loss = document_losses(
        unit.run_dir, unit.measures_dir, corpus=tc.corpus, max_chars=tc.max_chars,
        seq_len=tc.seq_len, tokens=cfg.eval_tokens, device=unit.device,
    )  # fmt: skip
    sizes_dir = unit.measures_dir / "sizes"
    before = {p.name: p.stat().st_mtime_ns for p in sizes_dir.glob("*.json")}
    sizes = circuit_sizes(
        unit.run_dir, cfg.tasks, sizes_dir, target_loss=cfg.target_loss,
        pruner={"steps": cfg.prune_steps}, n_train=cfg.n_train, n_heldout=cfg.n_heldout,
        device=unit.device, progress=unit.progress,
    )  # fmt: skip
    pruned = [t for t in cfg.tasks if before.get(f"{t}.json") != _mtime(sizes_dir / f"{t}.json")]
    if run.already_complete:
        status = "complete"
    else:
        status = "resumed" if run.resumed_from is not None else "trained"
    return {
        "point": unit.point.name,
        "seed": unit.seed,
        "status": status,
        "tasks_pruned_now": pruned,
        "seconds_now": round(time.perf_counter() - start, 3),
        "train_seconds": round(run.elapsed_s, 3),
        "val_loss": run.val_loss,
        "loss": loss,
        "sizes": sizes,
    }


def _mtime(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.is_file() else None


def _units(cfg: FrontierConfig, out: Path, device: str, progress: bool) -> list[Unit]:
    """Every unit, the largest models first: a step costs about the same at any kept fraction
    and grows with the width, so starting the slowest first keeps every job busy to the end."""
    points = sorted(cfg.points(), key=lambda p: -count_params(p.model))
    return [
        Unit(p, s, run_dir(out, p.name, s), measures_dir(out, p.name, s), cfg, device, progress)
        for p in points
        for s in cfg.seeds
    ]


def _claim(cfg: FrontierConfig, out: Path) -> None:
    """Refuse a directory that holds another frontier; record this one."""
    path = out / "config.json"
    resolved = cfg.to_dict()
    if path.is_file() and read_json(path, "frontier config") != resolved:
        raise NnobsError(f"{str(out)!r} holds a different frontier; use a new --out or delete it")
    write_json(path, resolved)


def run_frontier(
    cfg: FrontierConfig,
    out_dir: str | Path,
    *,
    jobs: int = 1,
    device: str = "cpu",
    log: Callable[[str], None] = lambda _msg: None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train, score and size every unit (resuming what is done) and write ``frontier.json``;
    ``log`` gets a line per finished unit, ``progress`` shows bars with ``jobs`` = 1."""
    from nnobs.core.results import write_result

    if jobs < 1:
        raise NnobsError(f"jobs must be a positive integer, got {jobs}")
    out = Path(out_dir)
    units = _units(cfg, out, device, progress and jobs == 1)
    with lock_directory(out, "frontier directory"):
        _claim(cfg, out)
        start = time.perf_counter()
        log(f"frontier {cfg.name}: {len(units)} models ({len(cfg.points())} grid points × "
            f"{len(cfg.seeds)} seeds), {len(cfg.tasks)} tasks, {jobs} job(s)")  # fmt: skip
        outcomes = _run_units(units, jobs, log)
        doc = frontier_document(cfg, outcomes, time.perf_counter() - start)
        write_result(out / "frontier.json", doc)
    return doc


def _describe(outcome: dict[str, Any]) -> str:
    sizes = outcome["sizes"]
    geo = sizes["geomean_edges"]
    return (
        f"{outcome['status']}, loss {outcome['loss']['loss']:.3f}, "
        f"{len(sizes['reached'])}/{len(sizes['tasks'])} tasks reached"
        + (f" (geomean {geo:.0f} edges)" if geo is not None else "")
        + f", pruned {len(outcome['tasks_pruned_now'])} now, {outcome['seconds_now']:.0f} s"
    )


def _run_units(units: list[Unit], jobs: int, log: Callable[[str], None]) -> dict:
    """Every unit's outcome by (point, seed); NnobsErrors are collected so the others finish."""
    outcomes, failures = {}, []

    def done(unit: Unit, outcome: dict | None, error: BaseException | None) -> None:
        what = f"{unit.point.name} seed {unit.seed}"
        count = f"[{len(outcomes) + len(failures) + 1}/{len(units)}]"
        if error is not None:
            failures.append(f"{what}: {error}")
            log(f"{count} {what} failed: {error}")
        else:
            outcomes[(unit.point.name, unit.seed)] = outcome
            log(f"{count} {what}: {_describe(outcome)}")

    run_jobs(units, run_unit, jobs, done)
    if failures:
        raise NnobsError(
            f"{len(failures)} of {len(units)} models failed ({'; '.join(failures)}); the others "
            "are kept: fix the cause and re-run the same command to resume"
        )
    return outcomes


def _measures(cfg: FrontierConfig, points: list[GridPoint], outcomes: dict) -> FrontierMeasures:
    """The claims' inputs over every task (NaN where a model misses the target); every model
    must have been scored on the same documents."""
    first = outcomes[(points[0].name, cfg.seeds[0])]["loss"]
    edges, sums = [], []
    for p in points:
        runs = [outcomes[(p.name, s)] for s in cfg.seeds]
        for o in runs:
            if o["loss"]["doc_ids"] != first["doc_ids"] or o["loss"]["tokens"] != first["tokens"]:
                raise NnobsError(
                    f"{p.name} was scored on other documents than {points[0].name}: the "
                    "models must share the corpus and tokenizer"
                )
        edges.append([[_log_edges(o["sizes"]["tasks"][t]) for t in cfg.tasks] for o in runs])
        sums.append([o["loss"]["sums"] for o in runs])
    log_edges = np.array(edges, dtype=np.float64).reshape(len(points), len(cfg.seeds), -1)
    return FrontierMeasures(log_edges, np.array(sums), np.array(first["tokens"]))


def _log_edges(record: dict[str, Any]) -> float:
    return float(np.log1p(record["edges"])) if record["reached"] else np.nan


def _unit_entry(outcome: dict[str, Any]) -> dict[str, Any]:
    sizes = outcome["sizes"]
    return {
        "seed": outcome["seed"],
        "status": outcome["status"],
        "val_loss": outcome["val_loss"],
        "loss": outcome["loss"]["loss"],
        "l0": outcome["loss"]["l0"],
        "step": outcome["loss"]["settings"]["step"],
        "train_seconds": outcome["train_seconds"],
        "eval_seconds": outcome["loss"]["seconds"],
        "sizing_seconds": round(sum(r["seconds"] for r in sizes["tasks"].values()), 3),
        "tasks_pruned_now": outcome["tasks_pruned_now"],
        "tasks": {
            name: {k: r[k] for k in ("reached", "edges", "nodes", "full_loss", "heldout_loss")}
            for name, r in sizes["tasks"].items()
        },
    }


def frontier_document(cfg: FrontierConfig, outcomes: dict, wall_s: float) -> dict[str, Any]:
    """The result document (schema ``nnobs.frontier``)."""

    points = cfg.points()
    entries = {p.name: [_unit_entry(outcomes[(p.name, s)]) for s in cfg.seeds] for p in points}
    not_reached = {
        name: sorted({t for e in runs for t, r in e["tasks"].items() if not r["reached"]})
        for name, runs in entries.items()
    }
    info = [{"name": p.name, "width": p.width, "nonzero": p.nonzero} for p in points]
    stats = claim_verdicts(
        _measures(cfg, points, outcomes),
        info,
        tasks=list(cfg.tasks),
        n_boot=cfg.n_boot,
        level=cfg.level,
    )
    measured = stats["points"]
    sized = [i for i, m in enumerate(measured) if m["geomean_edges"] is not None]
    optimal = pareto_optimal(
        [measured[i]["loss"] for i in sized], [measured[i]["geomean_edges"] for i in sized]
    )
    on_frontier = [False] * len(measured)  # without a circuit size, no point is on it
    for i, flag in zip(sized, optimal, strict=True):
        on_frontier[i] = flag
    rows = []
    for p, m, pareto in zip(points, measured, on_frontier, strict=True):
        runs = entries[p.name]
        rows.append({
            "name": p.name, "width": p.width, "nonzero": p.nonzero, "keep": p.keep,
            "n_params": count_params(p.model),
            "matrix_params": matrix_params(p.model),
            "l0": float(np.mean([r["l0"] for r in runs])),
            **m, "pareto": pareto, "not_reached": not_reached[p.name], "runs": runs,
        })  # fmt: skip
    seconds = {k: round(sum(r[k] for rs in entries.values() for r in rs), 1)
               for k in ("train_seconds", "eval_seconds", "sizing_seconds")}  # fmt: skip
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "kind": "frontier",
        "provenance": software_provenance(),
        "config": cfg.to_dict(),
        "tasks": {"all": list(cfg.tasks), "common": stats["common"]},
        "points": rows,
        "claims": stats["claims"],
        "statistics": {k: stats[k] for k in ("level", "n_boot", "n_tasks", "n_documents")},
        "timing": {"wall_seconds": round(wall_s, 1), **seconds},
    }
