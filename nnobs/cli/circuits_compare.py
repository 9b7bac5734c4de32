"""``nnobs circuits compare``: dense vs sparse circuit size at matched validation loss.

Prunes every task on both models (:mod:`nnobs.circuits.compare`), keeps each task's sizes
under ``--out/sizes/{dense,sparse}/`` as it goes (a second call resumes), and writes
``compare.json`` (schema ``nnobs/core/schemas/circuits_compare.schema.json``) and
``report/index.html`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nnobs.cli.common import add_mask_training_args, output_dir, subcommand
from nnobs.core.errors import NnobsError

SCHEMA = "nnobs.circuits_compare"

EPILOG = """\
examples:
  nnobs circuits compare --dense runs/dense --sparse runs/sparse --out runs/compare
  nnobs circuits compare --dense runs/dense --sparse runs/sparse --out out/cmp \\
      --tasks single_double_quote,bracket_counting --target-loss 0.2
  nnobs circuits compare --dense runs/dense --sparse runs/sparse --sparse-step 2048 \\
      --dense-step 768 --out out/pinned

The sparse run's checkpoint (the last, or --sparse-step) is matched with the dense run's
checkpoint whose validation loss is closest (or --dense-step). Every task (default: all 20)
is pruned on both to --target-loss; circuit size is edges (nonzero weights between kept
nodes). The headline is the geometric mean over tasks of (dense edges + 1) / (sparse edges
+ 1), with a 95% bootstrap interval over tasks and a one-sided Wilcoxon signed-rank test
of ratio > 1 at --level; tasks a model cannot do to the target are listed and left out.
Interrupted? Run the same command again: finished tasks are read back, not pruned again."""


def task_list(text: str) -> list[str]:
    """An argparse type for "a,b,c"."""
    return [t.strip() for t in text.split(",") if t.strip()]


def register(actions: argparse._SubParsersAction) -> None:
    parser = subcommand(
        actions,
        "compare",
        help="dense vs sparse circuit size over the tasks, at matched validation loss",
        description="Prune every task's circuit on a dense and a sparse model matched on "
        "validation loss and compare their sizes in edges.",
        epilog=EPILOG,
    )
    parser.add_argument("--dense", required=True, metavar="RUN", help="the dense nnobs run")
    parser.add_argument("--sparse", required=True, metavar="RUN", help="the sparse nnobs run")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory for the results")
    parser.add_argument("--tasks", type=task_list, help="comma-separated tasks (default: all 20)")
    parser.add_argument("--sparse-step", type=int, help="sparse checkpoint (default: last)")
    parser.add_argument(
        "--dense-step", type=int, help="dense checkpoint (default: closest validation loss)"
    )
    add_mask_training_args(parser)
    parser.add_argument("--level", type=float, default=0.05, help="test level (0.05)")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of gates, items, bootstrap")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def refuse_other_results(out: Path) -> None:
    """Refuse an --out directory that is a run or holds a result of another kind."""
    if (out / "run.json").is_file():
        raise NnobsError(f"--out {out} is a training run: write the comparison elsewhere")
    for path in sorted(out.glob("*.json")) if out.is_dir() else []:
        try:
            schema = json.loads(path.read_text()).get("schema")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(schema, str) and schema != SCHEMA:
            raise NnobsError(
                f"--out {out} holds a {schema} result ({path.name}): write the comparison "
                "to another directory"
            )


def run(args: argparse.Namespace) -> int:
    from nnobs.circuits.compare import compare_circuits
    from nnobs.core.files import check_output_dir
    from nnobs.core.results import load_result, to_plain, validate, write_result
    from nnobs.data.python_tasks import PYTHON_TASKS
    from nnobs.report.circuits_compare_page import render_circuits_compare

    out = output_dir(args.out)
    refuse_other_results(out)
    pruner = {"k_coef": args.k_coef, "lr": args.lr, "steps": args.steps, "batch": args.batch,
              "ablation": args.ablation, "seed": args.seed}  # fmt: skip
    doc = compare_circuits(
        args.dense, args.sparse, out, args.tasks or list(PYTHON_TASKS),
        target_loss=args.target_loss, dense_step=args.dense_step, sparse_step=args.sparse_step,
        pruner=pruner, n_train=args.n_train, n_heldout=args.n_heldout, level=args.level,
        n_boot=args.n_boot, seed=args.seed, device=args.device, progress=not args.no_progress,
    )  # fmt: skip
    doc = to_plain(doc)
    validate(doc)
    path = write_result(out / "compare.json", doc)
    report = check_output_dir(out / "report", "the report directory")
    page = render_circuits_compare(load_result(path, SCHEMA), report)
    print(doc["headline"]["statement"])
    print(f"wrote {path} and {page} (per-task sizes in {out / 'sizes'})")
    return 0
