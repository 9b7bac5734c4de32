"""``nnobs attribute``: gradient x input and integrated gradients on a frozen model.

Writes one JSON result (schema ``nnobs/core/schemas/interventions.schema.json``) into
``--out``, plus a plot of the attribution per token beside it.
"""

from __future__ import annotations

import argparse

from nnobs.cli.common import (
    add_intervention_args,
    add_task_args,
    load_adapter,
    load_task_from_args,
    output_dir,
    subcommand,
)
from nnobs.core.errors import NnobsError

EPILOG = """\
examples:
  nnobs attribute --model runs/default --task bracket --method ig --out out/
  nnobs attribute --model runs/default --task quote --site blocks.1.head_out --out out/

Integrated gradients doubles its steps until the attributions sum to f(input) - f(baseline)
within --tol (default 1%); the gap is reported per item. Writes attribute.json and
attribute.png (attribution per token) into --out."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subcommand(
        subparsers,
        "attribute",
        help="gradient x input / integrated gradients to tokens and sites",
        description="Attribute each item's logit difference to the activation at a site "
        "(embed: the input tokens), with the completeness check of integrated gradients.",
        epilog=EPILOG,
    )
    add_intervention_args(parser)
    add_task_args(parser, required=True)
    from nnobs.interventions.attribution import BASELINES, METHODS, RULES

    parser.add_argument("--method", choices=METHODS, default="ig")
    parser.add_argument("--site", default="embed", help="site attributed to (default: embed)")
    parser.add_argument("--baseline", choices=BASELINES, default="zero")
    parser.add_argument("--steps", type=int, help="fixed IG steps (default: adaptive)")
    parser.add_argument("--max-steps", type=int, default=1024, help="cap for adaptive steps")
    parser.add_argument(
        "--rule",
        choices=RULES,
        default="auto",
        help="quadrature over the path (auto: Gauss-Legendre, then dyadic intervals near 0)",
    )
    parser.add_argument("--tol", type=float, default=0.01, help="completeness tolerance")
    parser.add_argument("--items", type=int, default=8, help="first N items to attribute")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nnobs.core.results import write_result
    from nnobs.interventions.attribution import AttributionSettings, attribute
    from nnobs.report.intervention_plots import attribution_plot

    out = output_dir(args.out)
    adapter = load_adapter(args)
    task = load_task_from_args(args, adapter, equal_length=args.baseline == "corrupted")
    if args.items < 1:
        raise NnobsError(f"--items must be a positive integer, got {args.items}")
    settings = AttributionSettings(
        method=args.method,
        baseline=args.baseline,
        rule=args.rule,
        steps=args.steps,
        max_steps=args.max_steps,
        tol=args.tol,
        batch_size=args.batch_size,
    )
    result = attribute(adapter, task, args.site, settings, items=range(min(args.items, len(task))))
    path = write_result(out / "attribute.json", result)
    attribution_plot(result, out / "attribute.png")
    c = result["completeness"]
    worst = f"{c['max_rel_error']:.2%}" if c["max_rel_error"] is not None else "n/a"
    print(
        f"{path}: {len(result['items'])} items, completeness gap at most {worst} "
        f"({'within' if c['all_within_tol'] else 'NOT within'} {c['tol']:.0%})"
    )
    return 0
