"""The ``nnobs`` command line: one parser, with a subcommand per module in COMMAND_MODULES.

Each command module exposes ``register(subparsers)``, which adds its parser and sets
``func(args) -> int | None`` on it. User errors (:class:`NnobsError`) print one line,
``error: <message>``, and exit 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from nnobs.cli.common import OneLineParser
from nnobs.core.errors import NnobsError
from nnobs.core.version import __version__

COMMAND_MODULES = [
    "nnobs.cli.train",
    "nnobs.cli.observe",
    "nnobs.cli.patch",
    "nnobs.cli.ablate",
    "nnobs.cli.attribute",
    "nnobs.cli.study",
    "nnobs.cli.features",
    "nnobs.cli.finetune",
    "nnobs.cli.drift",
    "nnobs.cli.grow",
    "nnobs.cli.seeding",
    "nnobs.cli.routing",
    "nnobs.cli.bridge",
    "nnobs.cli.circuits",
    "nnobs.cli.report",
]

DESCRIPTION = """\
Observability of transformers: train small models with controlled architecture choices
and measure whether their activations keep readable evidence about their own decisions."""

EPILOG = """\
examples:
  nnobs train --preset tiny                   train a small model in seconds
  nnobs train                                 the default run (a few minutes on a CPU)
  nnobs <command> --help                      what a command does and its options"""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="nnobs",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nnobs {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="<command>")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status instead of exiting."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors
        return e.code if isinstance(e.code, int) else 2
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("nnobs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        return args.func(args) or 0
    except NnobsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        logger.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
