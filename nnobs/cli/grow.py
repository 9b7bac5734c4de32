"""``nnobs grow``: embed a trained run's model into a larger one that computes the same."""

from __future__ import annotations

import argparse
import json

from nnobs.cli.common import int_list, output_dir, subcommand

EPILOG = """\
examples:
  nnobs grow --small runs/small --config large.toml --out runs/large-seeded
  nnobs grow --small runs/small --config large.toml --out runs/grown --layer-map 0,2,4
  nnobs train --config large.toml --out runs/large-seeded      (trains the grown run on,
                                                               same --set overrides)

The large config may add heads (at the small model's head dimension: set model.d_head),
MLP neurons and layers; every other knob stays. A wider residual stream (d_model) is exact
only without norms (model.norm = "none") and is refused otherwise; new layers need a pre-norm
residual sum. The grown run's logits on held-out windows equal the small model's (the largest
difference is printed and stored in run.json under grown_from); new units write nothing at
first and are initialised from train.seed like a fresh run of the large config."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subcommand(
        subparsers,
        "grow",
        help="grow a trained run into a larger model exactly (seeded initialisation)",
        description="Embed a trained nnobs model into a larger one (more heads, wider MLPs,\n"
        "more layers) so that it computes exactly what the small model did, as a new run.",
        epilog=EPILOG,
    )
    parser.add_argument("--small", required=True, metavar="RUN", help="the trained small run")
    parser.add_argument(
        "--config", required=True, metavar="FILE", help="the large run's TOML config"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="new run directory")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting of the large config (repeatable)",
    )
    parser.add_argument(
        "--layer-map",
        type=int_list,
        metavar="J,J,...",
        help="the large layer of each small layer, increasing (default: the first layers)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nnobs.seeding.grown_run import grow_run
    from nnobs.training.runconfig import load_run_config

    out = output_dir(args.out)
    model_config, train_config = load_run_config(None, args.config, args.overrides)
    provenance = grow_run(args.small, model_config, train_config, out, args.layer_map)
    summary = {k: provenance[k] for k in ("layer_map", "max_logit_difference", "grow_s")}
    print(json.dumps({"out": str(out), **summary}))
    return 0
