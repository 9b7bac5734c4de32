"""``nnobs finetune``: continue training a run on another corpus, as a new run naming its parent."""

from __future__ import annotations

import argparse

from nnobs.cli.common import output_dir, subcommand

EPILOG = """\
examples:
  nnobs finetune runs/default --steps 200 --out runs/default-tests
  nnobs finetune runs/tiny --corpus path/to/code --steps 100 --lr 1e-3 --out runs/tiny-ft
  nnobs drift --before runs/default --after runs/default-tests --site blocks.1.mlp_hidden \\
      --out out/drift

The new run starts from the parent's latest checkpoint with the parent's model, tokenizer and
training settings, on --corpus (default: the standard library's test package, a second domain
of the same language) for --steps updates. Its run.json names the parent run and checkpoint
under finetuned_from. A corpus whose training split would be read more than 10 times in
--steps is refused. Killed part-way, the same command with nnobs train resumes it."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subcommand(
        subparsers,
        "finetune",
        help="continue training a run on another corpus (a new run naming its parent)",
        description="Fine-tune an nnobs run on another corpus: a new run directory that starts "
        "from the parent's weights and records where it came from.",
        epilog=EPILOG,
    )
    parser.add_argument("run", metavar="RUN", help="the parent nnobs run directory")
    parser.add_argument("--corpus", default="stdlib-tests", help="corpus (default: stdlib-tests)")
    parser.add_argument("--steps", type=int, required=True, help="optimiser updates")
    parser.add_argument("--out", required=True, metavar="DIR", help="new run directory")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the parent's)")
    parser.add_argument("--device", default="auto", help="torch device (default: auto)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nnobs.features.finetune import prepare_finetune
    from nnobs.training.trainer import train

    out = output_dir(args.out)
    model_config, train_config, parent = prepare_finetune(
        args.run, args.corpus, args.steps, out, lr=args.lr, device=args.device
    )
    result = train(model_config, train_config, out)
    loss = "n/a" if result.val_loss is None else f"{result.val_loss:.4f}"
    print(
        f"{out}: fine-tuned {parent['run']} on {args.corpus} for {result.step} steps, "
        f"validation loss {loss}"
    )
    return 0
