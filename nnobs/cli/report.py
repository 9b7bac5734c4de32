"""``nnobs report``: a self-contained HTML page from a study, run or observe directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from nnobs.cli.common import output_dir, subcommand

EPILOG = """\
examples:
  nnobs report runs/study-quick       a study: verdicts, comparison with CIs, per-variant plots
  nnobs report runs/default           a run: its trajectory (and observe result, if any)
  nnobs report runs/default/observe   one observe result

Writes DIR/report/index.html (or OUT/index.html) with its PNG plots embedded, and the PNGs
beside it. Every plot is drawn from the result JSON in DIR; nothing is recomputed."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subcommand(
        subparsers,
        "report",
        help="render a study, run or observe result as one HTML page with plots",
        description="Render the results in a directory (study.json, trajectory.json, "
        "observe.json) as one self-contained HTML page with PNG plots and verdicts.",
        epilog=EPILOG,
    )
    parser.add_argument("directory", metavar="DIR", help="a study, run or observe directory")
    parser.add_argument("--out", metavar="DIR", help="where to write (default: DIR/report)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nnobs.report.html import render_report

    out = None if args.out is None else output_dir(args.out)  # the default: render_report's
    page = render_report(Path(args.directory), out)
    print(f"wrote {page}")
    return 0
