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
import json
from pathlib import Path

from nnobs.cli.common import add_mask_training_args, load_adapter, output_dir, subcommand
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
    add_mask_training_args(parser)
    parser.add_argument("--temperature", type=float, default=1.0, help="surrogate temperature")
    parser.add_argument("--seed", type=int, default=0, help="seed of gates, items and checks")
    parser.add_argument("--n-check", type=int, default=128, help="held-out items for the checks")
    parser.add_argument(
        "--n-random", type=int, default=99, help="random node sets of the necessity test (99)"
    )
    parser.add_argument("--level", type=float, default=0.05, help="necessity test level (0.05)")
    parser.add_argument("--no-control", action="store_true", help="skip the nonsense control")
    parser.add_argument(
        "--corpus", help="corpus of the mean-ablation windows (default: the model's own)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress messages")


def _settings(args: argparse.Namespace):
    from nnobs.circuits.find import CircuitSettings

    return CircuitSettings(
        target_loss=args.target_loss, ablation=args.ablation, k_coef=args.k_coef,
        steps=args.steps, lr=args.lr, batch=args.batch, temperature=args.temperature,
        seed=args.seed, n_train=args.n_train, n_heldout=args.n_heldout, n_check=args.n_check,
        n_random=args.n_random, level=args.level, control=not args.no_control,
    )  # fmt: skip


def refuse_other_results(out: Path) -> None:
    """Refuse an --out directory that holds a result of another kind (or a run)."""
    if (out / "run.json").is_file():
        raise NnobsError(f"--out {out} is a training run: write circuits to another directory")
    for path in sorted(out.glob("*.json")) if out.is_dir() else []:
        try:
            schema = json.loads(path.read_text()).get("schema")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(schema, str) and schema != "nnobs.circuits":
            raise NnobsError(
                f"--out {out} holds a {schema} result ({path.name}): write circuits to "
                "another directory"
            )


def run(args: argparse.Namespace) -> int:
    from nnobs.circuits.find import check_model, find_circuit, reachable_items
    from nnobs.circuits.result import circuits_document
    from nnobs.circuits.sizes import reference_windows
    from nnobs.core.files import check_output_dir
    from nnobs.core.results import load_result, to_plain, validate, write_result
    from nnobs.data.python_tasks import PYTHON_TASKS
    from nnobs.report.circuits_page import draw_circuit, render_circuits

    missing = [f"--{name}" for name in ("model", "task", "out") if not getattr(args, name)]
    if missing:
        raise NnobsError(f"nnobs circuits needs {', '.join(missing)} (or an action)")
    if args.task not in PYTHON_TASKS:
        raise NnobsError(f"unknown task {args.task!r}: choose one of {', '.join(PYTHON_TASKS)}")
    out = output_dir(args.out)
    refuse_other_results(out)
    settings = _settings(args)
    adapter = load_adapter(args)
    check_model(adapter)
    reachable_items(adapter, args.task, settings)  # refusals before the corpus is read
    reference = info = None
    if settings.ablation == "mean":
        reference, info = reference_windows(
            adapter, args.corpus or adapter.provenance.get("corpus_spec")
        )
    sections = find_circuit(adapter, args.task, settings, reference, progress=not args.no_progress)
    doc = to_plain(circuits_document(sections, adapter.provenance, info))
    validate(doc)
    draw_circuit(doc, out / "circuit.png", out / "circuit.svg")
    path = write_result(out / "circuits.json", doc)
    report = check_output_dir(out / "report", "the report directory")
    page = render_circuits(load_result(path, "nnobs.circuits"), report)
    print(doc["verdict"]["statement"])
    print(f"wrote {path}, {out / 'circuit.png'}, {out / 'circuit.svg'} and {page}")
    return 0
