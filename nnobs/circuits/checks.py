"""The checks of a pruned circuit: sufficiency, necessity, and a nonsense-task control.

- **Sufficiency**: only the circuit live, every other node ablated (frozen at its mean, or
  zeroed): the task loss on held-out items the bisection never saw, with a bootstrap interval
  over those items. Sufficient when the loss is at most the target.
- **Necessity**: only the circuit ablated, the rest live: the task loss, against ``n_random``
  random node sets of the same size and the same number of nodes of each kind, drawn from
  the nodes outside the circuit. One-sided empirical test: ``p = (1 + #{random sets whose
  ablated loss ≥ the circuit's}) / (n_random + 1)``; necessary when ``p ≤ level``. Null: the
  circuit is one more such set (ablating it hurts no more than ablating as many other nodes
  of the same kinds). Intervals: the circuit's loss increase over the full model, and its
  excess over the random sets' mean, bootstrapped over held-out items.
- **Nonsense control**: the same mask training on the task with its labels shuffled per item
  (each item's answers swapped with probability ½, so the label is independent of the
  prompt). If some prefix of the τ ranking reaches the target loss on the shuffled items the
  masks trained on, the method can fit noise on this task; its held-out loss is reported too.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nnobs.circuits.masks import gate_edits
from nnobs.circuits.nodes import NodeLocation
from nnobs.circuits.prune import CircuitPruner, Node, keep_gates, logit_diffs, rank_nodes
from nnobs.core.errors import NnobsError
from nnobs.data.tasks import EncodedTask
from nnobs.measure.stats import bootstrap_ci
from nnobs.models.adapter import ModelAdapter

N_BOOT = 1000


def item_losses_with(
    adapter: ModelAdapter,
    locations: list[NodeLocation],
    task: EncodedTask,
    live: Collection[Node],
    means: dict[str, torch.Tensor] | None,
    invert: bool = False,
) -> np.ndarray:
    """Each item's task loss (nats) with only the ``live`` nodes live (``invert``: with only
    them ablated); ``adapter`` has the circuit sites."""
    gates = keep_gates(locations, list(live), adapter.device)
    if invert:
        gates = {site: 1.0 - g for site, g in gates.items()}
    with torch.no_grad():
        diffs = logit_diffs(adapter, task, np.arange(len(task)), gate_edits(gates, means))
    return F.softplus(-diffs.float()).cpu().numpy().astype(np.float64)


def full_losses(adapter: ModelAdapter, task: EncodedTask) -> np.ndarray:
    """Each item's task loss of the unedited model."""
    with torch.no_grad():
        diffs = logit_diffs(adapter, task, np.arange(len(task)), {})
    return F.softplus(-diffs.float()).cpu().numpy().astype(np.float64)


def mean_ci(values: np.ndarray, seed: int) -> list[float]:
    """95% bootstrap interval of the mean over items."""
    return list(bootstrap_ci(np.mean, values, n_boot=N_BOOT, seed=seed))


def composition(locations: list[NodeLocation], nodes: Collection[Node]) -> dict[str, int]:
    """Nodes per kind (only kinds present)."""
    kind = {loc.site: loc.kind for loc in locations}
    return dict(Counter(kind[site] for site, _ in nodes))


def random_node_sets(
    locations: list[NodeLocation], circuit: Collection[Node], n_sets: int, seed: int
) -> list[list[Node]] | None:
    """``n_sets`` random sets with the circuit's size and kinds, drawn from nodes outside it;
    None when some kind has fewer nodes outside the circuit than inside it."""
    inside = set(circuit)
    outside: dict[str, list[Node]] = {}
    for loc in locations:
        nodes = [(loc.site, i) for i in range(loc.width) if (loc.site, i) not in inside]
        outside.setdefault(loc.kind, []).extend(nodes)
    need = composition(locations, circuit)
    if any(len(outside.get(kind, [])) < k for kind, k in need.items()):
        return None
    rng = np.random.default_rng(seed)

    def draw() -> list[Node]:
        picks = {kind: rng.choice(len(outside[kind]), k, replace=False) for kind, k in need.items()}
        return [outside[kind][i] for kind, chosen in picks.items() for i in chosen]

    return [draw() for _ in range(n_sets)]


def sufficiency(
    adapter: ModelAdapter,
    locations: list[NodeLocation],
    circuit: Collection[Node],
    items: EncodedTask,
    means: dict[str, torch.Tensor] | None,
    target: float,
    seed: int = 0,
) -> dict[str, Any]:
    """Only the circuit live: held-out loss, its interval, the full model's, and the verdict."""
    losses = item_losses_with(adapter, locations, items, circuit, means)
    full = full_losses(adapter, items)
    loss = float(losses.mean())
    return {
        "loss": loss,
        "loss_ci95": mean_ci(losses, seed),
        "full_loss": float(full.mean()),
        "full_loss_ci95": mean_ci(full, seed),
        "target": target,
        "n_items": len(items),
        "sufficient": loss <= target,
    }


def necessity(
    adapter: ModelAdapter,
    locations: list[NodeLocation],
    circuit: Collection[Node],
    items: EncodedTask,
    means: dict[str, torch.Tensor] | None,
    n_random: int,
    level: float,
    seed: int = 0,
) -> dict[str, Any]:
    """Only the circuit ablated, against random same-size, same-kind sets outside it."""
    full = full_losses(adapter, items)
    out: dict[str, Any] = {
        "level": level, "n_random": n_random, "n_items": len(items),
        "composition": composition(locations, circuit), "full_loss": float(full.mean()),
        "null": "random node sets of the circuit's size and kinds, drawn outside the circuit",
    }  # fmt: skip
    sets = random_node_sets(locations, circuit, n_random, seed) if circuit else None
    if sets is None:
        reason = "the circuit is empty" if not circuit else "a kind has too few nodes outside it"
        return {**out, "testable": False, "reason": reason, "necessary": False}
    ablated = item_losses_with(adapter, locations, items, circuit, means, invert=True)
    random = np.stack([item_losses_with(adapter, locations, items, s, means, True) for s in sets])
    random_means = random.mean(axis=1)
    loss = float(ablated.mean())
    p = (1 + int((random_means >= loss).sum())) / (n_random + 1)
    return {
        **out,
        "testable": True,
        "ablated_loss": loss,
        "ablated_loss_ci95": mean_ci(ablated, seed),
        "effect": float((ablated - full).mean()),
        "effect_ci95": mean_ci(ablated - full, seed),
        "random_losses": [float(v) for v in random_means],
        "random_loss_median": float(np.median(random_means)),
        "excess_over_random": float((ablated - random.mean(axis=0)).mean()),
        "excess_over_random_ci95": mean_ci(ablated - random.mean(axis=0), seed),
        "p_value": p,
        "necessary": p <= level,
    }


def shuffled_labels(task: EncodedTask, seed: int) -> EncodedTask:
    """``task`` with each item's answers swapped with probability ½ (seeded)."""
    swap = np.random.default_rng(seed).random(len(task)) < 0.5
    correct = [b if s else a for a, b, s in zip(task.correct, task.incorrect, swap, strict=True)]
    wrong = [a if s else b for a, b, s in zip(task.correct, task.incorrect, swap, strict=True)]
    name = f"{task.name} (labels shuffled)"
    return dataclasses.replace(task, name=name, correct=correct, incorrect=wrong)


def prefix_sizes(n_nodes: int, active: int) -> list[int]:
    """Circuit sizes the control tries: powers of two up to every node, and the masks'
    own active count."""
    sizes = {n_nodes, active}
    k = 1
    while k < n_nodes:
        sizes.add(k)
        k *= 2
    return sorted(sizes)


def nonsense_control(
    adapter: ModelAdapter,
    pruner: CircuitPruner,
    train: EncodedTask,
    heldout: EncodedTask,
    reference: torch.Tensor | np.ndarray | None,
    means: dict[str, torch.Tensor] | None,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train ``pruner``'s masks on ``train`` with shuffled labels; the best loss any τ-ranked
    prefix reaches on those items, whether it meets the target, and its held-out loss.
    ``adapter`` has the circuit sites; ``means`` are its node means (None: zero ablation)."""
    noisy_train = shuffled_labels(train, pruner.seed + 1)
    noisy_heldout = shuffled_labels(heldout, pruner.seed + 2)
    pruner.fit_masks(adapter, noisy_train, reference, cache_dir)
    ranked = rank_nodes(pruner.tau_)
    active = sum(int((t > 0).sum()) for t in pruner.tau_.values())
    locations = pruner.locations_
    curve = {
        k: float(item_losses_with(adapter, locations, noisy_train, ranked[:k], means).mean())
        for k in prefix_sizes(len(ranked), active)
    }
    best = min(curve, key=curve.get)
    heldout_loss = item_losses_with(adapter, locations, noisy_heldout, ranked[:best], means)
    return {
        "trained_items": len(train),
        "active_after_training": active,
        "train_curve": [{"nodes": k, "loss": v} for k, v in curve.items()],
        "best_nodes": best,
        "best_train_loss": curve[best],
        "heldout_loss": float(heldout_loss.mean()),
        "target": pruner.target_loss,
        "reaches_target": curve[best] <= pruner.target_loss,
    }


def check_level(level: float, n_random: int) -> None:
    """Refuse a level outside (0, 1) or one ``n_random`` sets can never reach."""
    if not 0 < level < 1:
        raise NnobsError(f"the necessity level must be in (0, 1), got {level}")
    if n_random < 1 or 1 / (n_random + 1) > level:
        raise NnobsError(
            f"{n_random} random node sets cannot give p <= {level} (the smallest p is "
            f"1/(n+1)): use at least {int(np.ceil(1 / level)) - 1}"
        )
