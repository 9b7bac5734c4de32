"""Argument types and option groups shared by the subcommands (see :mod:`nnobs.cli`)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from nnobs.core.errors import NnobsError
from nnobs.core.files import check_output_dir

if TYPE_CHECKING:  # imported when run, inside the functions, to keep ``nnobs --help`` fast
    from nnobs.data.tasks import EncodedTask
    from nnobs.models.adapter import ModelAdapter


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


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, ``error: …``, exit status 2, like
    every other error of the command line (argparse prints the usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def output_dir(out: str | None, default: Path | None = None) -> Path:
    """The directory a command writes to: ``--out``, else ``default`` (commands whose --out is
    required pass none); refused in one line, before any work, when it cannot be a directory
    (:func:`nnobs.core.files.check_output_dir`)."""
    if out == "":
        raise NnobsError("--out is empty: give the directory for the results")
    if out is None:
        return check_output_dir(default, "the default output directory")
    return check_output_dir(out)


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


def add_intervention_args(parser: argparse.ArgumentParser) -> None:
    """The options every intervention command takes: model, output, device, batch, seed."""
    parser.add_argument(
        "--model", required=True, help="nnobs run directory or checkpoint, or a HF model path"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="directory for the results")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--step", type=int, help="checkpoint step of an nnobs run (default: last)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="seed for resampling and bootstrap")


def add_mask_training_args(parser: argparse.ArgumentParser) -> None:
    """The circuit-pruning options every circuits command shares (the paper's defaults)."""
    parser.add_argument(
        "--target-loss", type=float, default=0.15, help="held-out task loss, nats (0.15)"
    )
    parser.add_argument("--ablation", choices=("mean", "zero"), default="mean")
    parser.add_argument("--k-coef", type=float, default=1e-4, help="penalty per active node")
    parser.add_argument("--steps", type=int, default=500, help="mask training steps (500)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate of the gates")
    parser.add_argument("--batch", type=int, default=64, help="task items per step (64)")
    parser.add_argument("--n-train", type=int, default=512, help="task items the masks train on")
    parser.add_argument("--n-heldout", type=int, default=128, help="held-out items to bisect on")


def add_task_args(parser: argparse.ArgumentParser, required: bool) -> None:
    """--task, --n-items and --align: the prompt-pair task an intervention runs on."""
    parser.add_argument(
        "--task",
        required=required,
        help="built-in task (quote, bracket, paren, loop), a Python task (e.g. "
        "single_double_quote; see nnobs circuits --help) or a JSONL file",
    )
    parser.add_argument("--n-items", type=int, default=64, help="items of a built-in task")
    parser.add_argument(
        "--align",
        choices=("left", "right"),
        help="line up clean and corrupted prompts of different token lengths",
    )


def load_adapter(args: argparse.Namespace) -> ModelAdapter:
    """The model named by --model (at --step) on --device, with its tokenizer."""
    from nnobs.models.load import load_model

    return require_tokenizer(load_model(args.model, device=args.device, step=args.step), args.model)


def require_tokenizer(adapter: ModelAdapter, spec: str) -> ModelAdapter:
    """``adapter``, refused in one line if it has no tokenizer: every command encodes text."""
    if adapter.tokenizer is None:
        raise NnobsError(
            f"no tokenizer in {spec}: save the model's tokenizer there with "
            f"tokenizer.save_pretrained({spec!r})"
        )
    return adapter


def load_task_from_args(
    args: argparse.Namespace, adapter: ModelAdapter, equal_length: bool
) -> EncodedTask:
    """The task named by --task (a built-in task, one of the 20 Python tasks or a JSONL
    file), tokenized by the model's tokenizer."""
    from nnobs.data.python_tasks import PYTHON_TASKS, load_python_task
    from nnobs.data.tasks import load_task

    if args.n_items < 1:
        raise NnobsError(f"--n-items must be a positive integer, got {args.n_items}")
    if args.task in PYTHON_TASKS:
        tok, n, align = adapter.tokenizer, args.n_items, args.align
        return load_python_task(args.task, tok, n=n, equal_length=equal_length, align=align)
    return load_task(
        args.task, adapter.tokenizer, equal_length=equal_length, align=args.align, n=args.n_items
    )
