"""``nnobs train``: train a model from a preset or a TOML run config, resuming if possible."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nnobs.cli.common import add_source, output_dir, subcommand

EPILOG = """\
examples:
  nnobs train --preset tiny
  nnobs train --preset default --out runs/base --set model.activation=relu
  nnobs train --config study.toml --set train.steps=500 --set model.d_mlp=[512,64,512,512]
  torchrun --nproc_per_node=2 -m nnobs.cli train --preset default    (data parallel)

Re-running the same command with the same --out resumes from the latest checkpoint; a
finished run is left as it is. The run directory holds run.json, tokenizer.json,
metrics.jsonl and checkpoints/step_NNNNNN/ (see nnobs.train)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    from nnobs.training.runconfig import preset_names

    parser = subcommand(
        subparsers,
        "train",
        help="train a transformer (preset or TOML config), resumable, CPU/GPU/multi-process",
        description="Train a transformer from a preset or a run config file. Checkpoints\n"
        "are log-spaced early and linear late, for measuring observability over training.",
        epilog=EPILOG,
    )
    add_source(
        parser,
        preset_help=f"a shipped run config: {', '.join(preset_names())} (default: default)",
        config_help="a TOML file with [model] and [train] tables",
    )
    parser.add_argument(
        "--out", metavar="DIR", help="run directory (default: runs/<preset or config name>)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting, value as a TOML literal (repeatable), "
        "e.g. model.d_model=256 or train.steps=500",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="discard a different run already in --out"
    )
    parser.add_argument(
        "--observe",
        action="store_true",
        help="measure observability at each checkpoint while training, within 10%% of the "
        "training time (writes OUT/trajectory/trajectory.json)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nnobs.training.runconfig import load_run_config
    from nnobs.training.trainer import train

    name = Path(args.config).stem if args.config else (args.preset or "default")
    out = output_dir(args.out, Path("runs") / name)
    model_config, train_config = load_run_config(args.preset, args.config, args.overrides)
    callback = None
    if args.observe:
        from nnobs.observe.live import ObservabilityCallback

        callback = ObservabilityCallback(out, log=lambda msg: print(f"· {msg}", file=sys.stderr))
    result = train(
        model_config,
        train_config,
        out,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        on_checkpoint=callback,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
        print(
            f"{out}: step {result.step}, val loss {val} nats/token "
            f"(unigram baseline {result.unigram_loss:.4f}), "
            f"{result.tokens_seen:,} tokens in {result.elapsed_s:.1f} s"
        )
        warning = callback.check_observed() if callback is not None else None
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    return 0
