"""Find one task's circuit in a model and check it: what ``nnobs circuits`` computes.

Items: the task's train split (the masks train on it) and its held-out split, whose first
``n_heldout`` items the bisection uses (the same items :mod:`nnobs.circuits.sizes` bisects
on, so both report the same circuit) and whose next ``n_check`` items only the checks see,
so sufficiency is measured on items no choice was made on. A task whose held-out split runs
out is split in halves instead (the result records the counts).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nnobs.circuits import checks
from nnobs.circuits.edges import circuit_edge_list, circuit_edges
from nnobs.circuits.masks import ABLATIONS, node_means
from nnobs.circuits.nodes import NODE_KINDS, NodeLocation, circuit_adapter, node_counts
from nnobs.circuits.prune import CircuitPruner, Node
from nnobs.core.errors import NnobsError
from nnobs.data.python_tasks import PYTHON_TASKS, load_python_task
from nnobs.data.tasks import EncodedTask
from nnobs.models.adapter import ModelAdapter

log = logging.getLogger(__name__)

MIN_CHECK_ITEMS = 16
EDGE_LIST_LIMIT = 5000  # edges listed in the result (largest |weight| first); all are counted


@dataclass(frozen=True)
class CircuitSettings:
    """Every choice of one pruning and its checks (stored in the result)."""

    target_loss: float = 0.15
    ablation: str = "mean"
    k_coef: float = 1e-4
    steps: int = 500
    lr: float = 3e-3
    batch: int = 64
    temperature: float = 1.0
    seed: int = 0
    n_train: int = 512
    n_heldout: int = 128
    n_check: int = 128
    n_random: int = 99
    level: float = 0.05
    control: bool = True

    def __post_init__(self) -> None:
        if not self.target_loss > 0:
            raise NnobsError(f"the target loss must be positive (nats), got {self.target_loss}")
        if self.ablation not in ABLATIONS:
            raise NnobsError(f"unknown ablation {self.ablation!r}: use {', '.join(ABLATIONS)}")
        for name in ("steps", "batch", "n_train", "n_heldout", "n_check"):
            low = 0 if name == "steps" else 1
            if getattr(self, name) < low:
                raise NnobsError(f"{name} must be at least {low}, got {getattr(self, name)}")
        for name in ("k_coef", "lr", "temperature"):
            if not np.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise NnobsError(f"{name} must be a finite non-negative number")
        if not self.temperature > 0 or not self.lr > 0:
            raise NnobsError("lr and temperature must be positive")
        checks.check_level(self.level, self.n_random)

    def pruner(self) -> CircuitPruner:
        return CircuitPruner(
            k_coef=self.k_coef, lr=self.lr, steps=self.steps, batch=self.batch,
            target_loss=self.target_loss, ablation=self.ablation,
            temperature=self.temperature, seed=self.seed,
        )  # fmt: skip


@dataclass
class TaskItems:
    train: EncodedTask
    bisect: EncodedTask
    check: EncodedTask


def task_items(tokenizer: Any, name: str, settings: CircuitSettings) -> TaskItems:
    """The train, bisection and check items of task ``name`` (see the module docstring)."""
    if name not in PYTHON_TASKS:
        raise NnobsError(f"unknown Python task {name!r}: choose one of {', '.join(PYTHON_TASKS)}")
    train = load_python_task(name, tokenizer, "train", settings.n_train)
    pool = load_python_task(name, tokenizer, "heldout", settings.n_heldout + settings.n_check)
    n_bisect = settings.n_heldout
    if len(pool) - n_bisect < MIN_CHECK_ITEMS:
        n_bisect = len(pool) // 2
    if n_bisect < MIN_CHECK_ITEMS:
        raise NnobsError(
            f"task {name!r} has only {len(pool)} held-out items: too few to bisect and check"
        )
    return TaskItems(train, pool.subset(range(n_bisect)), pool.subset(range(n_bisect, len(pool))))


def check_model(adapter: ModelAdapter) -> ModelAdapter:
    """The adapter with circuit sites; refused in one line before any work when the model
    has no node sites (not an nnobs Transformer) or no additive residual to count edges on."""
    extended = circuit_adapter(adapter)
    circuit_edges(adapter, ())
    if adapter.tokenizer is None:
        raise NnobsError("the model has no tokenizer: the tasks need one to encode their prompts")
    return extended


def reachable_items(
    adapter: ModelAdapter, name: str, settings: CircuitSettings
) -> tuple[TaskItems, float]:
    """The task's items and the full model's loss on the bisection items; refused in one line
    when that loss is above the target (no circuit can reach it)."""
    items = task_items(adapter.tokenizer, name, settings)
    full = float(checks.full_losses(circuit_adapter(adapter), items.bisect).mean())
    if full > settings.target_loss:
        raise NnobsError(
            f"the full model's held-out loss on {name!r} is {full:.4f} nats, above the target "
            f"{settings.target_loss}: no circuit can reach it (raise --target-loss)"
        )
    return items, full


def node_records(locations: list[NodeLocation], kept: set[Node], tau: dict) -> list[dict]:
    """The kept nodes in forward order, with layer, kind, sublayer, channel and τ."""
    return [
        {"site": loc.site, "kind": loc.kind, "layer": loc.layer, "sublayer": loc.sublayer,
         "index": i, "tau": float(tau[loc.site][i])}
        for loc in locations for i in range(loc.width) if (loc.site, i) in kept
    ]  # fmt: skip


def edge_records(adapter: ModelAdapter, kept: set[Node], nodes: list[dict]) -> list[dict]:
    """The circuit's edges (largest |weight| first, at most EDGE_LIST_LIMIT) as indices
    into ``nodes``."""
    at = {(n["site"], n["index"]): i for i, n in enumerate(nodes)}
    edges = sorted(circuit_edge_list(adapter, kept), key=lambda e: -abs(e[3]))
    return [
        {"source": at[src], "target": at[dst], "kind": kind, "weight": weight}
        for kind, src, dst, weight in edges[:EDGE_LIST_LIMIT]
    ]


def circuit_section(adapter: ModelAdapter, pruner: CircuitPruner) -> dict[str, Any]:
    """Size and make-up of the fitted circuit: nodes and edges per kind, and their lists."""
    kept = pruner.kept_
    nodes = node_records(pruner.locations_, kept, pruner.tau_)
    edges = circuit_edges(adapter, kept)
    listed = edge_records(adapter, kept, nodes)
    by_kind = checks.composition(pruner.locations_, kept)
    return {
        "n_nodes": len(kept),
        "n_edges": edges["total"],
        "nodes_by_kind": {kind: by_kind.get(kind, 0) for kind in NODE_KINDS},
        "model_nodes_by_kind": node_counts(pruner.locations_),
        "edges_by_kind": {k: v for k, v in edges.items() if k != "total"},
        "heldout_loss": pruner.heldout_loss_,
        "nodes": nodes,
        "edges": listed,
        "edges_listed_all": len(listed) == edges["total"],
    }


def find_circuit(
    adapter: ModelAdapter,
    name: str,
    settings: CircuitSettings,
    reference: torch.Tensor | np.ndarray | None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Prune task ``name`` on ``adapter``, check the circuit, and return the result's
    sections (task, settings, full model, circuit, training, bisection, checks, timing);
    ``progress`` logs each stage."""
    say = log.info if progress else (lambda *_: None)
    extended = check_model(adapter)
    items, full = reachable_items(adapter, name, settings)
    timing: dict[str, float] = {}
    start = time.perf_counter()
    say("· training masks on %s (%d steps)", name, settings.steps)
    pruner = settings.pruner().fit(adapter, items.train, items.bisect, reference, cache_dir)
    timing["pruning_s"] = time.perf_counter() - start
    means = None
    if settings.ablation == "mean":
        means = node_means(extended, pruner.locations_, reference, cache_dir)
    kept, locations = pruner.kept_, pruner.locations_
    say("· checking the circuit of %d nodes", len(kept))
    start = time.perf_counter()
    found = {
        "sufficiency": checks.sufficiency(
            extended, locations, kept, items.check, means, settings.target_loss, settings.seed
        ),
        "necessity": checks.necessity(
            extended, locations, kept, items.check, means, settings.n_random, settings.level,
            settings.seed,
        ),
    }  # fmt: skip
    timing["checks_s"] = time.perf_counter() - start
    control = None
    if settings.control:
        say("· nonsense control: training masks on shuffled labels")
        start = time.perf_counter()
        control = checks.nonsense_control(
            extended, settings.pruner(), items.train, items.check, reference, means, cache_dir
        )
        timing["control_s"] = time.perf_counter() - start
    return {
        "task": _task_section(name, items),
        "settings": asdict(settings),
        "full_model": {"bisect_loss": full},
        "circuit": circuit_section(adapter, pruner),
        "training": {"objective": pruner.losses_, "active": pruner.active_},
        "bisection": [{"nodes": k, "loss": v} for k, v in pruner.curve_.items()],
        "checks": {**found, "nonsense_control": control},
        "timing": timing,
    }


def _task_section(name: str, items: TaskItems) -> dict[str, Any]:
    task = PYTHON_TASKS[name]
    return {
        "name": name,
        "description": task.description,
        "answers": list(task.answers),
        "n_train": len(items.train),
        "n_bisect": len(items.bisect),
        "n_check": len(items.check),
    }
