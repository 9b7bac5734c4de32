"""``nnobs patch``: activation patching sweeps on a frozen model.

Writes one JSON result (schema ``nnobs/core/schemas/interventions.schema.json``) into
``--out``, plus a heatmap per sweep beside it.
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

EPILOG = """\
examples:
  nnobs patch --model runs/default --task quote --out runs/default/patch
  nnobs patch --model runs/default --task bracket --sweep heads --all-positions --out out/
  nnobs patch --model gpt2 --task my_task.jsonl --align right --source corrupted --out out/

Built-in tasks: quote, bracket, paren, loop; or a JSON-lines file with one object per line:
  {"clean": ..., "corrupted": ..., "correct": ..., "incorrect": ...}
Writes patch.json and patch_<sweep>.png (effect per unit x position) into --out."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subcommand(
        subparsers,
        "patch",
        help="activation patching sweeps (layers x positions, components, heads)",
        description="Patch activations from clean prompts into corrupted ones (or back) and "
        "measure how much of the clean logit difference returns, per unit and position.",
        epilog=EPILOG,
    )
    add_intervention_args(parser)
    add_task_args(parser, required=True)
    from nnobs.interventions.patching import SOURCES, SWEEPS

    parser.add_argument(
        "--sweep",
        action="append",
        choices=SWEEPS,
        help="what to patch, repeatable (default: resid_pre, attn_out, mlp_out)",
    )
    parser.add_argument(
        "--all-positions", action="store_true", help="patch each unit at all positions at once"
    )
    parser.add_argument(
        "--source", choices=SOURCES, default="clean", help="run the activations come from"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nnobs.core.results import write_result
    from nnobs.interventions.patching import PatchSettings, patch_sweep
    from nnobs.report.intervention_plots import patching_heatmap

    out = output_dir(args.out)
    adapter = load_adapter(args)
    task = load_task_from_args(args, adapter, equal_length=True)
    settings = PatchSettings(
        source=args.source,
        per_position=not args.all_positions,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    result = patch_sweep(
        adapter,
        task,
        args.sweep or ["resid_pre", "attn_out", "mlp_out"],
        settings,
        progress=not args.no_progress,
    )
    path = write_result(out / "patch.json", result)
    for sweep in result["sweeps"]:
        patching_heatmap(result, sweep, out / f"patch_{sweep['name']}.png")
    base = result["baseline"]
    print(
        f"{path}: {task.name}, {len(task)} items, clean {base['clean_logit_diff']:.3f}, "
        f"corrupted {base['corrupted_logit_diff']:.3f}; "
        f"sweeps: {', '.join(s['name'] for s in result['sweeps'])}"
    )
    return 0
