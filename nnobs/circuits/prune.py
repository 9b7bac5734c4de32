"""Learned circuit pruning (Gao et al. 2025): the smallest set of nodes that still does a task.

:class:`CircuitPruner` learns one τ per node (:mod:`nnobs.circuits.masks`) with the model
frozen, minimising the task loss (:mod:`nnobs.circuits.task_loss`) plus ``k_coef`` times the
number of active nodes, with AdamW over τ alone (no weight decay: the node penalty is the
pressure towards small circuits). Then the nodes are ranked by τ and the number kept is
bisected to the smallest circuit whose held-out task loss is at most ``target_loss``; every
other node is mean-ablated (or zeroed). The bisection assumes the loss falls as nodes are
added in τ order, which ``curve_`` records so it can be checked.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from nnobs.circuits.masks import ABLATIONS, NodeMasks, gate_edits, node_means
from nnobs.circuits.nodes import NodeLocation, circuit_adapter, node_locations
from nnobs.circuits.task_loss import binary_task_loss
from nnobs.core.errors import NnobsError
from nnobs.data.tasks import EncodedTask
from nnobs.models.adapter import Edit, ModelAdapter

Node = tuple[str, int]  # (site, channel)
PAD_BATCH = 256  # prompts per forward pass when scoring


def smallest_passing(
    n_nodes: int, loss_at: Callable[[int], float], target: float
) -> tuple[int, dict[int, float]]:
    """The smallest ``k`` in 0..n_nodes with ``loss_at(k) <= target``, by bisection (``loss_at``
    assumed non-increasing in ``k``), and every loss evaluated on the way. Refused when even
    ``k = n_nodes`` misses the target."""
    curve = {n_nodes: loss_at(n_nodes)}
    if not curve[n_nodes] <= target:
        raise NnobsError(
            f"the full model's held-out task loss {curve[n_nodes]:.4f} nats is above the "
            f"target {target}: no circuit can reach it (raise the target loss)"
        )
    failing, passing = -1, n_nodes
    while passing - failing > 1:
        mid = (failing + passing) // 2
        curve[mid] = loss_at(mid)
        if curve[mid] <= target:
            passing = mid
        else:
            failing = mid
    return passing, dict(sorted(curve.items()))


def rank_nodes(tau: dict[str, torch.Tensor]) -> list[Node]:
    """Every node, highest τ first (ties kept in forward order)."""
    nodes = [(site, i) for site, t in tau.items() for i in range(len(t))]
    values = torch.cat([t.flatten().cpu() for t in tau.values()])
    order = torch.sort(values, descending=True, stable=True).indices.tolist()
    return [nodes[i] for i in order]


def keep_gates(
    locations: list[NodeLocation], kept: list[Node], device: torch.device
) -> dict[str, torch.Tensor]:
    """0/1 gates per site with exactly the ``kept`` nodes on."""
    gates = {loc.site: torch.zeros(loc.width, device=device) for loc in locations}
    for site, i in kept:
        gates[site][i] = 1.0
    return gates


def logit_diffs(
    adapter: ModelAdapter, task: EncodedTask, items: np.ndarray, edits: dict[str, Edit]
) -> torch.Tensor:
    """``l_correct − l_incorrect`` at the last position of each chosen item's clean prompt, in
    the order of ``items``, under ``edits``, differentiable. Prompts are right-padded into
    batches of at most ``PAD_BATCH``: attention is causal and every other operation acts per
    position, so the tokens after a prompt's end never reach its last position."""
    rows = [int(i) for i in items]
    out = []
    with adapter.hooks(edits=edits):
        for start in range(0, len(rows), PAD_BATCH):
            chunk = rows[start : start + PAD_BATCH]
            lengths = torch.tensor([len(task.clean[i]) for i in chunk])
            ids = torch.zeros(len(chunk), int(lengths.max()), dtype=torch.long)
            for r, i in enumerate(chunk):
                ids[r, : lengths[r]] = torch.tensor(task.clean[i])
            device = adapter.device
            pos = torch.arange(len(chunk), device=device)
            last = adapter.forward(ids.to(device))[pos, lengths.to(device) - 1].float()
            right = torch.tensor([task.correct[i] for i in chunk], device=device)
            wrong = torch.tensor([task.incorrect[i] for i in chunk], device=device)
            out.append(last[pos, right] - last[pos, wrong])
    return torch.cat(out)


class CircuitPruner:
    """Learn a task circuit's nodes in a frozen nnobs model (scikit-learn style).

    ``k_coef``: penalty per active node; ``lr``: AdamW learning rate of τ; ``steps``: mask
    training steps; ``batch``: task items per step; ``target_loss``: held-out task loss (nats)
    the circuit must reach; ``ablation``: ``"mean"`` or ``"zero"`` for pruned nodes;
    ``temperature``: of the surrogate gradient; ``seed``: τ's initial noise and batches.

    After :meth:`fit`: ``tau_`` (τ per site), ``kept_`` (the circuit: a set of
    ``(site, channel)``), ``heldout_loss_`` (the circuit's held-out task loss), ``curve_``
    (kept nodes → held-out loss, every size the bisection tried), ``locations_``, ``losses_``
    (training objective per step) and ``active_`` (active nodes per step, before the step).
    """

    def __init__(
        self,
        k_coef: float = 1e-4,
        lr: float = 3e-3,
        steps: int = 500,
        batch: int = 64,
        target_loss: float = 0.15,
        ablation: str = "mean",
        temperature: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.k_coef = k_coef
        self.lr = lr
        self.steps = steps
        self.batch = batch
        self.target_loss = target_loss
        self.ablation = ablation
        self.temperature = temperature
        self.seed = seed

    def _check(self) -> None:
        if self.ablation not in ABLATIONS:
            raise NnobsError(
                f"unknown ablation {self.ablation!r}: choose one of {', '.join(ABLATIONS)}"
            )
        if self.steps < 0 or self.batch < 1:
            raise NnobsError(f"steps must be >= 0 and batch >= 1, got {self.steps}, {self.batch}")

    def fit(
        self,
        adapter: ModelAdapter,
        task_items: EncodedTask,
        heldout: EncodedTask,
        reference: torch.Tensor | np.ndarray | None = None,
        cache_dir: str | Path | None = None,
    ) -> CircuitPruner:
        """Train the masks on ``task_items``, then bisect the circuit on ``heldout`` items.
        ``reference``: pretraining-distribution token windows the means are taken over
        (needed for mean ablation); ``cache_dir``: where the mean cache lives."""
        means = self._fit_masks(adapter, task_items, reference, cache_dir)
        self._bisect(circuit_adapter(adapter), heldout, means)
        return self

    def fit_masks(
        self,
        adapter: ModelAdapter,
        task_items: EncodedTask,
        reference: torch.Tensor | np.ndarray | None = None,
        cache_dir: str | Path | None = None,
    ) -> CircuitPruner:
        """Train the masks only (``tau_``, ``locations_``, ``losses_``, ``active_``), without
        bisecting: for a task no circuit is expected to reach a target on, such as a control."""
        self._fit_masks(adapter, task_items, reference, cache_dir)
        return self

    def _fit_masks(self, adapter, task_items, reference, cache_dir) -> dict | None:
        """Train the masks; returns the node means (None for zero ablation)."""
        self._check()
        adapter = circuit_adapter(adapter)
        self.locations_ = node_locations(adapter)
        means = self._means(adapter, reference, cache_dir)
        masks = NodeMasks(self.locations_, self.temperature, self.seed).to(adapter.device)
        frozen = [(p, p.requires_grad) for p in adapter.model.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        try:
            self.losses_, self.active_ = self._train(adapter, task_items, masks, means)
            self.tau_ = masks.tau()
        finally:
            for p, flag in frozen:
                p.requires_grad_(flag)
        return means

    def _means(self, adapter, reference, cache_dir) -> dict[str, torch.Tensor] | None:
        if self.ablation == "zero":
            return None
        if reference is None:
            raise NnobsError("mean ablation needs reference windows of the pretraining corpus")
        return node_means(adapter, self.locations_, reference, cache_dir)

    def _train(self, adapter, task, masks: NodeMasks, means) -> tuple[list[float], list[int]]:
        opt = torch.optim.AdamW(masks.parameters(), lr=self.lr, weight_decay=0.0)
        rng = np.random.default_rng(self.seed)
        losses, active = [], []
        for _ in range(self.steps):
            items = rng.choice(len(task), size=min(self.batch, len(task)), replace=False)
            gates = masks.gates()
            diffs = logit_diffs(adapter, task, items, gate_edits(gates, means))
            n_active = masks.n_active(gates)
            loss = binary_task_loss(diffs) + self.k_coef * n_active
            opt.zero_grad()
            loss.backward()
            opt.step()
            masks.clamp_()
            losses.append(float(loss.detach()))
            active.append(int(n_active.detach()))
        return losses, active

    def heldout_loss(
        self,
        adapter: ModelAdapter,
        heldout: EncodedTask,
        kept: list[Node],
        means: dict[str, torch.Tensor] | None,
    ) -> float:
        """Held-out task loss with only ``kept`` nodes live (``adapter`` with circuit sites)."""
        gates = keep_gates(self.locations_, kept, adapter.device)
        with torch.no_grad():
            diffs = logit_diffs(adapter, heldout, np.arange(len(heldout)), gate_edits(gates, means))
        return float(binary_task_loss(diffs))

    def _bisect(self, adapter, heldout: EncodedTask, means) -> None:
        ranked = rank_nodes(self.tau_)
        k, self.curve_ = smallest_passing(
            len(ranked),
            lambda n: self.heldout_loss(adapter, heldout, ranked[:n], means),
            self.target_loss,
        )
        self.kept_ = set(ranked[:k])
        self.heldout_loss_ = self.curve_[k]
