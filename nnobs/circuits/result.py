"""The circuits result document (schema ``nnobs/core/schemas/circuits.schema.json``) and its
verdict.

The verdict is "circuit found" only when both checks pass: the circuit is sufficient (only
it live, its loss on held-out check items is at most the target) and necessary (ablating it
raises the loss more than ablating random node sets of its size and kinds, one-sided
empirical p at most the level). Otherwise the statement names the check that failed. The
nonsense control's outcome is always stated: if shuffled labels reach the target on the items
the masks trained on, the method can fit noise on this task.
"""

from __future__ import annotations

from typing import Any

from nnobs.core.results import software_provenance

SCHEMA = "nnobs.circuits"
SCHEMA_VERSION = 1


def _failures(checks: dict[str, Any]) -> list[str]:
    suff, nec = checks["sufficiency"], checks["necessity"]
    failed = []
    if not suff["sufficient"]:
        failed.append(
            f"not sufficient: with only the circuit live the held-out loss is "
            f"{suff['loss']:.3f} nats, above the target {suff['target']}"
        )
    if not nec["testable"]:
        failed.append(f"necessity untestable: {nec['reason']}")
    elif not nec["necessary"]:
        failed.append(
            f"not necessary: ablating it raises the loss to {nec['ablated_loss']:.3f}, not more "
            f"than random sets of its size and kinds (median {nec['random_loss_median']:.3f}; "
            f"p = {nec['p_value']:.3f} > {nec['level']})"
        )
    return failed


def control_sentence(control: dict[str, Any] | None) -> str:
    """The nonsense control's outcome in one sentence."""
    if control is None:
        return "Nonsense control not run."
    if control["reaches_target"]:
        return (
            f"Nonsense control: with labels shuffled, {control['best_nodes']} nodes reach "
            f"{control['best_train_loss']:.3f} nats on the items the masks trained on (target "
            f"{control['target']}): the method can fit noise on this task (held-out loss "
            f"{control['heldout_loss']:.3f})."
        )
    return (
        f"Nonsense control: with labels shuffled the best circuit reaches "
        f"{control['best_train_loss']:.3f} nats on its own training items, missing the target "
        f"{control['target']}: pruning did not fit noise here."
    )


def verdict(circuit: dict[str, Any], checks: dict[str, Any]) -> dict[str, Any]:
    """``circuit_found``, the failed checks, and a one-line statement."""
    failed = _failures(checks)
    size = f"{circuit['n_nodes']} nodes, {circuit['n_edges']} edges"
    if not failed:
        suff, nec = checks["sufficiency"], checks["necessity"]
        head = (
            f"Circuit found: {size}; sufficient (held-out loss {suff['loss']:.3f} <= target "
            f"{suff['target']}) and necessary (ablated loss {nec['ablated_loss']:.3f} vs random "
            f"sets' median {nec['random_loss_median']:.3f}, p = {nec['p_value']:.3f} <= "
            f"{nec['level']})."
        )
    else:
        head = f"No circuit verdict for the {size}: " + "; ".join(failed) + "."
    control = checks["nonsense_control"]
    return {
        "circuit_found": not failed,
        "failed": failed,
        "fits_noise": None if control is None else control["reaches_target"],
        "statement": f"{head} {control_sentence(control)}",
    }


def circuits_document(
    sections: dict[str, Any], model: dict[str, Any], reference: dict[str, Any] | None
) -> dict[str, Any]:
    """The result document from :func:`nnobs.circuits.find.find_circuit`'s sections, the
    model's provenance and where the means came from."""
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "kind": "circuits",
        "provenance": software_provenance(),
        "model": model,
        "reference": reference,
        **sections,
        "verdict": verdict(sections["circuit"], sections["checks"]),
    }
