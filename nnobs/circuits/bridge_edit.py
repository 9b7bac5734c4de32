"""An edit transfer from start to result document (``nnobs.bridge_edit``): choose the channel
(given, or the residual-read node of the sparse model's pruned task circuit with the largest
mean |Δ|), measure the dense model's counterfactual-answer probability against α for the edit
and for random-channel controls of the same size, and test the edit at α = 1
(:mod:`nnobs.circuits.edit_transfer`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from nnobs.circuits.bridge_model import Bridges
from nnobs.circuits.edit_transfer import (
    DEFAULT_ALPHAS,
    bridge_site,
    control_channels,
    counterfactual_probs,
    edit_direction,
    edit_items,
    edit_test,
    mean_abs_delta,
    mean_with_interval,
    read_deltas,
    stream_rms,
)
from nnobs.circuits.prune import CircuitPruner
from nnobs.circuits.task_loss import task_loss
from nnobs.core.errors import NnobsError
from nnobs.core.fields import check_bool, check_int, check_number
from nnobs.core.results import software_provenance
from nnobs.data.tasks import EncodedTask
from nnobs.models.adapter import ModelAdapter

SCHEMA = "nnobs.bridge_edit"
SCHEMA_VERSION = 1
READ_KINDS = ("attn_in", "mlp_in")


@dataclass(frozen=True)
class EditSettings:
    """Strengths ``alphas`` (in [0, 1], 1 included: the test's strength), ``n_controls``
    random control channels, the test's ``level`` and ``n_perm`` sign flips, ``n_boot``
    bootstrap resamples over items, and the ``seed`` of controls, flips and resamples;
    ``align_right``: also use items whose two prompts differ in length, lined up at their last
    token (:func:`~nnobs.circuits.edit_transfer.read_deltas`)."""

    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    n_controls: int = 8
    level: float = 0.05
    n_perm: int = 10000
    n_boot: int = 1000
    seed: int = 0
    align_right: bool = False

    def __post_init__(self) -> None:
        for alpha in self.alphas:
            check_number("alpha", alpha, 0, 1)
        if 1.0 not in self.alphas:
            raise NnobsError("the strengths must include 1 (the test is stated at alpha = 1)")
        check_int("n_controls", self.n_controls, 1)
        check_number("level", self.level, 0, 1, open_low=True, open_high=True)
        check_int("n_perm", self.n_perm, 100)
        check_int("n_boot", self.n_boot, 100)
        check_int("seed", self.seed, 0)
        check_bool("align_right", self.align_right)


def circuit_channel(
    sparse: ModelAdapter,
    train: EncodedTask,
    heldout: EncodedTask,
    reference: torch.Tensor,
    pruner: CircuitPruner,
    align_right: bool = False,
) -> tuple[str, int, dict]:
    """Prune the sparse model on the task and take the circuit's residual-read channel with the
    largest mean |Δ| on the held-out items; also what the choice was made from. Refused at
    once when the whole model misses the pruner's target loss on the held-out items."""
    full = task_loss(sparse, heldout)
    if not full <= pruner.target_loss:
        raise NnobsError(
            f"the sparse model's held-out loss on {heldout.name!r} is {full:.4f} nats, above the "
            f"circuit's target {pruner.target_loss}: no circuit reaches it (raise --target-loss "
            "or name a channel with --channel)"
        )
    pruner.fit(sparse, train, heldout, reference)
    reads = sorted(n for n in pruner.kept_ if n[0].rsplit(".", 1)[-1] in READ_KINDS)
    if not reads:
        raise NnobsError(
            f"the pruned circuit of {train.name!r} ({len(pruner.kept_)} nodes) keeps no residual "
            "read channel: name one with --channel SITE:INDEX"
        )
    sites = sorted({site for site, _ in reads})
    deltas = read_deltas(sparse, heldout, sites, align_right)
    candidates = [
        {"site": site, "channel": c, "mean_abs_delta": float(mean_abs_delta(deltas[site])[c])}
        for site, c in reads
    ]
    best = max(candidates, key=lambda row: row["mean_abs_delta"])
    info = {
        "n_nodes": len(pruner.kept_),
        "heldout_loss": pruner.heldout_loss_,
        "target_loss": pruner.target_loss,
        "ablation": pruner.ablation,
        "candidates": candidates,
    }
    return best["site"], best["channel"], info


def transfer_edit(
    bridges: Bridges,
    dense: ModelAdapter,
    sparse: ModelAdapter,
    task: EncodedTask,
    site: str,
    channel: int,
    reference: torch.Tensor,
    settings: EditSettings,
) -> dict:
    """The edit's curve against α with its controls, and the test at α = 1."""
    items = edit_items(sparse, task, site, channel, settings.align_right)
    if len(items.ids) < 2:
        raise NnobsError(
            f"only {len(items.ids)} usable items in task {task.name!r}: need 2 or more"
        )
    where = bridge_site(site)
    rms_sparse, rms_dense = (
        stream_rms(sparse, where, reference),
        stream_rms(dense, where, reference),
    )
    rms_ratio = rms_sparse / rms_dense
    edit_dir = edit_direction(bridges, dense, sparse, site, channel, rms_ratio)
    controls = control_channels(bridges.d_sparse, channel, settings.n_controls, settings.seed)
    control_dirs = [edit_direction(bridges, dense, sparse, site, c, rms_ratio) for c in controls]
    size = float(edit_dir.norm())
    control_dirs = [u * size / float(u.norm()) if float(u.norm()) > 0 else u for u in control_dirs]
    directions = torch.stack([edit_dir, *control_dirs])
    curve, probs = [], {}
    for i, alpha in enumerate(sorted(set(settings.alphas))):
        p = counterfactual_probs(dense, items, site, directions, alpha)
        probs[alpha] = p
        boot = {"n_boot": settings.n_boot, "seed": settings.seed + i}
        curve.append(
            {
                "alpha": alpha,
                "edit": mean_with_interval(p[0], **boot),
                "control": mean_with_interval(p[1:].mean(0), **boot),
            }
        )
    test = edit_test(probs[1.0][0], probs[1.0][1:], settings.level, settings.n_perm,
                     settings.n_boot, settings.seed)  # fmt: skip
    return {
        "channel": {
            "site": site,
            "channel": channel,
            "bridge_site": where,
            "mean_abs_delta": float(mean_abs_delta(items.deltas)),
            "rms_sparse": rms_sparse,
            "rms_dense": rms_dense,
            "direction_norm": size,
        },
        "controls": controls,
        "items": {"n_used": len(items.ids), "n_left_out": items.n_left_out},
        "curve": curve,
        "test": {"alpha": 1.0, **test},
        "per_item_alpha1": {
            "edit": probs[1.0][0].tolist(),
            "control": probs[1.0][1:].mean(0).tolist(),
            "baseline": probs[min(probs)][0].tolist(),
        },
    }


def edit_document(config: dict, task: dict, chosen: dict, result: dict, settings: EditSettings):
    """The ``nnobs.bridge_edit`` result document."""
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "kind": "bridge_edit",
        "provenance": software_provenance(),
        "dense": config["dense"],
        "sparse": config["sparse"],
        "shape": config["shape"],
        "task": task,
        "chosen_by": chosen,
        "settings": {**asdict(settings), "alphas": sorted(set(settings.alphas))},
        **result,
    }
