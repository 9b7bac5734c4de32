"""``nnobs circuits frontier``: pretraining loss against circuit size over a grid of width × L0.

Writes ``frontier.json`` (schema ``nnobs/core/schemas/frontier.schema.json``) and
``report/index.html`` (with the Pareto plot) into ``--out``, next to the runs it trains.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nnobs.cli.common import add_source, output_dir, subcommand
from nnobs.core.errors import NnobsError

EPILOG = """\
examples:
  nnobs circuits frontier --preset cpu --out runs/frontier --jobs 2
  nnobs circuits frontier --config my_frontier.toml --out runs/my-frontier
  nnobs circuits frontier --preset cpu --out runs/frontier     (again: resumes, trains nothing new)

Trains one model per grid point (total width × L0: each width dense and at each nonzero-weight
target, the same L0 at every width) and training seed, on the same tokens in the same order;
scores each on held-out documents and prunes a circuit for each task to the target task loss.
Reports loss against the geometric mean of circuit edges over the tasks every model reaches
(tasks a model cannot reach are listed per model), and tests the paper's two claims: at a fixed
width sparser models have smaller circuits but higher loss; at a fixed L0 more total parameters
give smaller circuits and lower loss. Each comparison of two models is paired over the tasks
both reach. Each claim: supported, contradicted or inconclusive at the config's level, with
bootstrap intervals over tasks, documents and seeds.

The cpu preset (6 models of width 64 and 128, 2 seeds, 3000 steps, 8 tasks) takes about 100
minutes with --jobs 2 on 2 free CPU cores (benchmarks/README.md, "The capability-interpretability
frontier"). Re-running the same command
resumes: finished runs, losses and circuit sizes are kept, interrupted runs continue from their
last checkpoint; a directory holding another frontier is refused."""


def register(actions: argparse._SubParsersAction) -> None:
    from nnobs.circuits.frontier_config import preset_names

    parser = subcommand(
        actions,
        "frontier",
        help="loss vs circuit size over width × L0, and the paper's two claims tested",
        description="Train a grid of weight-sparse models (total width × nonzero weights), "
        "measure each one's pretraining loss and circuit sizes, and test whether sparser and "
        "wider models move the loss–circuit-size frontier as the paper claims.",
        epilog=EPILOG,
    )
    names = ", ".join(n.removeprefix("frontier_") for n in preset_names())
    add_source(parser, f"a shipped frontier: {names} (default: cpu)", "a frontier TOML file")
    parser.add_argument(
        "--out", metavar="DIR", help="frontier directory (default: runs/frontier-NAME)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="models in parallel processes (1)")
    parser.add_argument("--device", default="cpu", help="torch device for scoring and pruning")
    parser.add_argument("--no-progress", action="store_true", help="no progress messages")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nnobs.circuits.frontier import run_frontier
    from nnobs.circuits.frontier_config import load_frontier_config
    from nnobs.core.files import check_output_dir
    from nnobs.core.results import load_result
    from nnobs.report.frontier_page import render_frontier

    if args.jobs < 1:
        raise NnobsError(f"--jobs must be a positive integer, got {args.jobs}")
    cfg = load_frontier_config(args.preset, args.config)
    out = output_dir(args.out, Path("runs") / f"frontier-{cfg.name}")
    log = (lambda _m: None) if args.no_progress else (lambda m: print(f"· {m}", file=sys.stderr))
    doc = run_frontier(
        cfg, out, jobs=args.jobs, device=args.device, log=log, progress=not args.no_progress
    )
    report = check_output_dir(out / "report", "the report directory")
    page = render_frontier(load_result(out / "frontier.json", "nnobs.frontier"), report)
    print(summary(doc))
    print(f"\nwrote {out / 'frontier.json'} and {page}")
    return 0


def summary(doc: dict) -> str:
    """The frontier as a table, then each claim's verdict."""
    from nnobs.report.frontier_page import seed_note

    lines = [
        f"{'model':<14} {'params':>9} {'L0':>9} {'edges':>9}  {'loss':>6}  not reached",
    ]
    for p in doc["points"]:
        edges = "—" if p["geomean_edges"] is None else f"{p['geomean_edges']:.1f}"
        lines.append(
            f"{p['name']:<14} {p['n_params']:>9,} {p['l0']:>9,.0f} {edges:>9}  {p['loss']:.3f}  "
            + (", ".join(p["not_reached"]) or "—")
        )
    common = doc["tasks"]["common"]
    names = ", ".join(common) or "none"
    lines.append(
        f"\ncircuit size: geometric mean over {len(common)} common tasks: {names} (each "
        "comparison: over the tasks both of its models reach)"
    )
    lines.append(f"intervals: {seed_note(doc)}")
    for name, claim in doc["claims"].items():
        lines.append(
            f"claim {name}: {claim['verdict']} (circuit size {claim['edges_verdict']}, loss "
            f"{claim['loss_verdict']}): {claim['statement']}"
        )
    t = doc["timing"]
    lines.append(
        f"{t['wall_seconds']:.0f} s this call; compute: training {t['train_seconds']:.0f} s, "
        f"scoring {t['eval_seconds']:.0f} s, pruning {t['sizing_seconds']:.0f} s"
    )
    return "\n".join(lines)
