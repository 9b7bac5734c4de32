"""``nnobs study``: train architecture variants × seeds, observe every checkpoint, compare."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nnobs.cli.common import add_source, output_dir, subcommand

EPILOG = """\
examples:
  nnobs study --preset quick --jobs 2          3 variants × 3 seeds, ~10 min on 2 CPU cores
  nnobs study --preset activation --jobs 4     ReLU vs GELU vs SwiGLU (a bigger machine)
  nnobs study --config my_study.toml --out runs/my-study
  nnobs report runs/study-quick                the page that answers the study's question

Variants are matched in parameter count to the baseline (the study's match_params_by knob),
every run sees the same tokens in the same order (data_seed) and training seeds vary only
the initialisation. Writes OUT/study.json (schema nnobs/core/schemas/study.schema.json) and one
run directory per variant and seed under OUT/runs/. Re-running the same command resumes:
finished runs are kept, interrupted ones continue from their last checkpoint."""


def register(subparsers: argparse._SubParsersAction) -> None:
    from nnobs.observe.study_config import study_preset_names

    parser = subcommand(
        subparsers,
        "study",
        help="compare architecture variants over training (matched params, same data, seeds)",
        description="Train every variant of a study with every training seed, observe every "
        "checkpoint, and write one study result with confidence intervals across seeds.",
        epilog=EPILOG,
    )
    add_source(
        parser,
        preset_help=f"a shipped study: {', '.join(study_preset_names())} (default: quick)",
        config_help="a study TOML file",
    )
    parser.add_argument("--out", metavar="DIR", help="study directory (default: runs/study-NAME)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs trained in parallel processes (default: 1)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress messages")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nnobs.observe.study import run_study
    from nnobs.observe.study_config import load_study_config
    from nnobs.report.study_page import variant_verdict_text

    cfg = load_study_config(args.preset, args.config)
    out = output_dir(args.out, Path("runs") / f"study-{cfg.name}")
    log = (
        (lambda _msg: None)
        if args.no_progress
        else (lambda msg: print(f"· {msg}", file=sys.stderr))
    )
    result = run_study(cfg, out, jobs=args.jobs, log=log)
    if result.get("question"):
        print(result["question"])
    for v in result["variants"]:
        print(f"  {v['name']:<16} {v['verdict']:<14} {variant_verdict_text(v)}")
    print(
        f"\nwrote {out / 'study.json'} in {result['wall_seconds']:.0f} s; render it with: "
        f"nnobs report {out}"
    )
    return 0
