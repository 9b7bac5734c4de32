"""``nnobs seeding``: the persistence experiment of seeded initialisation, one command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nnobs.cli.common import add_source, output_dir, subcommand

EPILOG = """\
examples:
  nnobs seeding --preset tiny --out runs/seeding-tiny          (a minute or two)
  OMP_NUM_THREADS=1 nnobs seeding --out runs/seeding           (default preset: ~20 min, CPU)
  nnobs seeding --set seeding.attribute='"indent_level"' --set large.train.steps=800
  nnobs seeding --config my_seeding.toml --out runs/my-seeding

Per training seed (at least 5; every run shares one data order) it trains a small model with
and without an auxiliary head predicting a Python attribute (seeding.attribute) from the
residual after seeding.aux_layer, grows each into the large model exactly (nnobs grow), and
trains them and a random-init large model on the next-token loss alone. Every checkpoint
(log-spaced, then linear) is probed for the attribute at every layer on held-out test
documents: ridge R² for bracket_depth and indent_level, accuracy for token_type and
in_string. The analysis is fixed in advance: per-checkpoint gaps (seeded − random, paired by
seed) with seed-bootstrap intervals; one decay model (exponential, its asymptote decides);
power law and late mean as sensitivity only; verdict per layer persists / decays / absent;
the control 'seeded without the auxiliary task' analysed the same way. It is its own
command, not an `nnobs study` preset: its conditions are grown runs, not architecture variants.

Writes OUT/seeding.json (schema nnobs.seeding) and OUT/report/index.html; the runs, grown
runs and probe scores stay under OUT, so re-running the same command resumes. Presets: the
[seeding], [small.model], [small.train], [large.model], [large.train] tables."""


def register(subparsers: argparse._SubParsersAction) -> None:
    from nnobs.seeding.config import preset_names

    parser = subcommand(
        subparsers,
        "seeding",
        help="seeded initialisation: does a planted representation persist? (resumable)",
        description="The seeded-initialisation persistence experiment: small models with and\n"
        "without an auxiliary task, grown exactly into a larger model and trained on, against\n"
        "random init, probed at every layer and checkpoint, analysed as declared in advance.",
        epilog=EPILOG,
    )
    add_source(
        parser,
        preset_help=f"a shipped experiment: {', '.join(preset_names())} (default: default)",
        config_help="a TOML file with [seeding], [small.*] and [large.*] tables",
    )
    parser.add_argument("--out", metavar="DIR", help="directory (default: runs/seeding-<name>)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting: seeding.KEY=V or small|large.model|train.KEY=V (repeatable)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nnobs.core.results import write_result
    from nnobs.report.seeding_page import render_seeding
    from nnobs.seeding.config import load_seeding_config
    from nnobs.seeding.experiment import SeedingExperiment

    name = Path(args.config).stem if args.config else (args.preset or "default")
    out = output_dir(args.out, Path("runs") / f"seeding-{name}")
    config = load_seeding_config(args.preset, args.config, args.overrides)

    def say(message: str) -> None:
        print(f"· {message}", file=sys.stderr)

    doc = SeedingExperiment(config, out, say).run()
    write_result(out / "seeding.json", doc)
    page = render_seeding(doc, out / "report")
    primary = doc["comparisons"][doc["plan"]["primary"]]
    for layer, result in enumerate(primary["layers"]):
        lo, hi = result["asymptote_ci"]
        print(
            f"layer {layer}: {result['verdict']} (asymptote {result['asymptote']:+.3f} "
            f"[{lo:+.3f}, {hi:+.3f}], early gap {result['early_gap']:+.3f})"
        )
    print(f"wrote {out / 'seeding.json'} and {page}")
    return 0
