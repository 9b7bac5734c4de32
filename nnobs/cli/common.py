"""Subcommands of the ``nnobs`` command line, one module each (see :mod:`nnobs.cli`)."""

import argparse
import re


def int_list(text: str) -> list[int]:
    """An argparse type for "0,2,5", "-1,-2" or a range "43-49"."""
    try:
        if re.fullmatch(r"\s*\d+\s*-\s*\d+\s*", text):
            lo, hi = (int(x) for x in text.split("-"))
            return list(range(lo, hi + 1))
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers like 0,2,5 or a range like 43-49, got {text!r}"
        ) from None


def subcommand(
    subparsers: argparse._SubParsersAction, name: str, help: str, description: str, epilog: str
) -> argparse.ArgumentParser:
    """A subcommand parser whose epilog keeps its line breaks."""
    return subparsers.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_source(parser: argparse.ArgumentParser, preset_help: str, config_help: str) -> None:
    """--preset NAME | --config FILE: where a command's settings come from."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", metavar="NAME", help=preset_help)
    source.add_argument("--config", metavar="FILE", help=config_help)
