"""``nnobs circuits``: prune a task circuit out of a trained model, and its sub-actions.

``nnobs circuits --model RUN --task NAME --out DIR`` learns the circuit (:mod:`nnobs.circuits`),
checks it and writes ``circuits.json`` (schema ``nnobs/core/schemas/circuits.schema.json``),
the circuit graph (PNG and SVG) and ``report/index.html`` into ``--out``. Further actions
(``nnobs circuits <action> ...``) are the modules in ``CIRCUIT_ACTIONS``, each with
``register(actions)`` like the commands in :mod:`nnobs.cli`; an action's options go after
its name.
"""

from __future__ import annotations

import argparse
import importlib

from nnobs.cli.common import subcommand
from nnobs.core.errors import NnobsError

# Modules adding an action under ``nnobs circuits`` (each has ``register(actions)``).
CIRCUIT_ACTIONS: list[str] = ["nnobs.cli.circuits_frontier", "nnobs.cli.circuits_compare"]

EPILOG = """\
examples:
  nnobs circuits --model runs/sparse --task single_double_quote --out out/quote
  nnobs circuits --model runs/sparse --task bracket_counting --target-loss 0.1 --out out/brk
  nnobs circuits <action> --help            what an action does (listed above)

Learns one gate per node (residual reads and writes, MLP neurons, q/k/v channels) of the
frozen model against the task loss plus --k-coef per active node, then keeps the smallest
number of nodes (ranked by the learned gates) whose held-out task loss is at most
--target-loss; every other node is frozen at its mean over corpus windows (--ablation mean)
or zeroed. Circuit size is counted in edges: nonzero weights between kept nodes.
Checks: sufficiency (circuit alone, held-out loss against the target), necessity (circuit
ablated, against random node sets of the same size and kinds, one-sided test at --level),
and a control that prunes the same task with its labels shuffled."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subcommand(
        subparsers,
        "circuits",
        help="prune a task circuit (nodes, edges), check it, draw it",
        description="Learn the smallest circuit of a model that still does a binary "
        "next-token task, check that it is sufficient and necessary, and draw it.",
        epilog=EPILOG,
    )
    add_pruning_args(parser)
    parser.set_defaults(func=run)
    actions = parser.add_subparsers(
        dest="action", required=False, title="actions", metavar="<action>"
    )
    for name in CIRCUIT_ACTIONS:
        importlib.import_module(name).register(actions)


def add_pruning_args(parser: argparse.ArgumentParser) -> None:
    """The options of pruning one circuit (none required by argparse, so that an action can
    stand alone; :func:`run` asks for --model, --task and --out)."""
    parser.add_argument("--model", help="nnobs run directory or checkpoint")
    parser.add_argument("--task", help="one of the 20 Python tasks, e.g. single_double_quote")
    parser.add_argument("--out", metavar="DIR", help="directory for the results")
    parser.add_argument("--step", type=int, help="checkpoint step (default: last)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--target-loss", type=float, default=0.15, help="held-out task loss, nats (0.15)"
    )
    parser.add_argument("--ablation", choices=("mean", "zero"), default="mean")
    parser.add_argument("--k-coef", type=float, default=1e-4, help="penalty per active node")
    parser.add_argument("--steps", type=int, default=500, help="mask training steps")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate of the gates")
    parser.add_argument("--batch", type=int, default=64, help="task items per step")
    parser.add_argument("--temperature", type=float, default=1.0, help="surrogate temperature")
    parser.add_argument("--seed", type=int, default=0, help="seed of gates, items and checks")
    parser.add_argument("--n-train", type=int, default=256, help="task items pruning trains on")
    parser.add_argument("--n-heldout", type=int, default=128, help="held-out task items")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    missing = [f"--{name}" for name in ("model", "task", "out") if not getattr(args, name)]
    if missing:
        raise NnobsError(f"nnobs circuits needs {', '.join(missing)} (or an action)")
    raise NnobsError("circuit pruning from the command line is not available yet")
