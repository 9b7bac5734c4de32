"""``nnobs ablate``, ``nnobs patch``, ``nnobs attribute``: interventions on a frozen model.

Each writes one JSON result (schema ``nnobs/core/schemas/interventions.schema.json``) into
``--out``, plus plots beside it for patching and attribution.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nnobs.cli.common import int_list, subcommand
from nnobs.core.errors import NnobsError

PATCH_EPILOG = """\
examples:
  nnobs patch --model runs/default --task quote --out runs/default/patch
  nnobs patch --model runs/default --task bracket --sweep heads --all-positions --out out/
  nnobs patch --model gpt2 --task my_task.jsonl --align right --source corrupted --out out/

Built-in tasks: quote, bracket, paren, loop; or a JSON-lines file with one object per line:
  {"clean": ..., "corrupted": ..., "correct": ..., "incorrect": ...}
Writes patch.json and patch_<sweep>.png (effect per unit x position) into --out."""

ABLATE_EPILOG = """\
examples:
  nnobs ablate --model runs/default --site blocks.1.mlp_out --mode mean --out out/
  nnobs ablate --model runs/default --site blocks.0.head_out --heads 2 --task quote --out out/
  nnobs ablate --model runs/default --direction-from runs/default/observe/observe.json \\
      --later-probes --out out/

Without --task the measure is next-token loss on corpus windows; with --task the logit
difference on its clean prompts. Mean ablation takes the mean over reference windows of the
corpus (cached per model and corpus). --direction-from runs the causal test of an observe
result's probe direction instead: project it out (or scale it) at the probe's layer.
Writes ablate.json (or direction.json) into --out."""

ATTRIBUTE_EPILOG = """\
examples:
  nnobs attribute --model runs/default --task bracket --method ig --out out/
  nnobs attribute --model runs/default --task quote --site blocks.1.head_out --out out/

Integrated gradients doubles its steps until the attributions sum to f(input) - f(baseline)
within --tol (default 1%); the gap is reported per item. Writes attribute.json and
attribute.png (attribution per token) into --out."""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="nnobs run directory or checkpoint, or a HF model path"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="directory for the results")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--step", type=int, help="checkpoint step of an nnobs run (default: last)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="seed for resampling and bootstrap")


def _task_args(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument(
        "--task", required=required, help="built-in task (quote, bracket, paren, loop) or JSONL"
    )
    parser.add_argument("--n-items", type=int, default=64, help="items of a built-in task")
    parser.add_argument(
        "--align",
        choices=("left", "right"),
        help="line up clean and corrupted prompts of different token lengths",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    patch = subcommand(
        subparsers,
        "patch",
        help="activation patching sweeps (layers x positions, components, heads)",
        description="Patch activations from clean prompts into corrupted ones (or back) and "
        "measure how much of the clean logit difference returns, per unit and position.",
        epilog=PATCH_EPILOG,
    )
    _common(patch)
    _task_args(patch, required=True)
    from nnobs.interventions.patching import SOURCES, SWEEPS

    patch.add_argument(
        "--sweep",
        action="append",
        choices=SWEEPS,
        help="what to patch, repeatable (default: resid_pre, attn_out, mlp_out)",
    )
    patch.add_argument(
        "--all-positions", action="store_true", help="patch each unit at all positions at once"
    )
    patch.add_argument(
        "--source", choices=SOURCES, default="clean", help="run the activations come from"
    )
    patch.add_argument("--no-progress", action="store_true", help="no progress bar")
    patch.set_defaults(func=run_patch)

    ablate = subcommand(
        subparsers,
        "ablate",
        help="ablate a site, heads, neurons or a direction; change in loss or task metric",
        description="Replace part of an activation by zero, its reference mean or another "
        "input's value, and report the change with a bootstrap interval over examples.",
        epilog=ABLATE_EPILOG,
    )
    _common(ablate)
    _task_args(ablate, required=False)
    ablate.add_argument("--site", help="hook site, e.g. blocks.1.mlp_out or blocks.0.head_out")
    ablate.add_argument("--heads", type=int_list, help="head indices (head_out), e.g. 0,3")
    ablate.add_argument("--neurons", type=int_list, help="neuron indices (mlp_hidden)")
    ablate.add_argument("--positions", type=int_list, help="positions (negative from the end)")
    ablate.add_argument("--mode", choices=("zero", "mean", "resample"), default="zero")
    ablate.add_argument("--corpus", default="stdlib", help="corpus for windows (default: stdlib)")
    ablate.add_argument("--split", default="validation", help="split measured on")
    ablate.add_argument("--windows", type=int, default=32, help="number of corpus windows")
    ablate.add_argument("--window-len", type=int, default=64, help="tokens per window")
    ablate.add_argument("--reference-split", default="train", help="split the mean is taken on")
    ablate.add_argument("--reference-windows", type=int, default=64, help="windows for the mean")
    ablate.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    ablate.add_argument(
        "--direction-from", metavar="JSON", help="an observe result: test its probe direction"
    )
    ablate.add_argument("--direction-mode", choices=("project_out", "scale"), default="project_out")
    ablate.add_argument("--factor", type=float, default=0.0, help="scale factor (scale mode)")
    ablate.add_argument(
        "--later-probes",
        action="store_true",
        help="fit probes at later layers (reference windows) and report their pcorr change",
    )
    ablate.set_defaults(func=run_ablate)

    attribute = subcommand(
        subparsers,
        "attribute",
        help="gradient x input / integrated gradients to tokens and sites",
        description="Attribute each item's logit difference to the activation at a site "
        "(embed: the input tokens), with the completeness check of integrated gradients.",
        epilog=ATTRIBUTE_EPILOG,
    )
    _common(attribute)
    _task_args(attribute, required=True)
    from nnobs.interventions.attribution import BASELINES, METHODS, RULES

    attribute.add_argument("--method", choices=METHODS, default="ig")
    attribute.add_argument("--site", default="embed", help="site attributed to (default: embed)")
    attribute.add_argument("--baseline", choices=BASELINES, default="zero")
    attribute.add_argument("--steps", type=int, help="fixed IG steps (default: adaptive)")
    attribute.add_argument("--max-steps", type=int, default=1024, help="cap for adaptive steps")
    attribute.add_argument(
        "--rule",
        choices=RULES,
        default="auto",
        help="quadrature over the path (auto: Gauss-Legendre, then dyadic intervals near 0)",
    )
    attribute.add_argument("--tol", type=float, default=0.01, help="completeness tolerance")
    attribute.add_argument("--items", type=int, default=8, help="first N items to attribute")
    attribute.set_defaults(func=run_attribute)


def _load(args: argparse.Namespace):
    from nnobs.models.load import load_model

    return load_model(args.model, device=args.device, step=args.step)


def _task(args, adapter, equal_length: bool):
    from nnobs.data.tasks import load_task

    if args.n_items < 1:
        raise NnobsError(f"--n-items must be a positive integer, got {args.n_items}")
    return load_task(
        args.task, adapter.tokenizer, equal_length=equal_length, align=args.align, n=args.n_items
    )


def _write(doc: dict, path: Path) -> Path:
    from nnobs.core.results import write_result

    return write_result(path, doc)


def run_patch(args: argparse.Namespace) -> int:
    from nnobs.interventions.patching import patch_sweep
    from nnobs.report.intervention_plots import patching_heatmap

    adapter = _load(args)
    task = _task(args, adapter, equal_length=True)
    doc = patch_sweep(
        adapter,
        task,
        args.sweep or ["resid_pre", "attn_out", "mlp_out"],
        per_position=not args.all_positions,
        source=args.source,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.no_progress,
    )
    out = Path(args.out)
    path = _write(doc, out / "patch.json")
    for sweep in doc["sweeps"]:
        patching_heatmap(doc, sweep, out / f"patch_{sweep['name']}.png")
    base = doc["baseline"]
    print(
        f"{path}: {task.name}, {len(task)} items, clean {base['clean_logit_diff']:.3f}, "
        f"corrupted {base['corrupted_logit_diff']:.3f}; "
        f"sweeps: {', '.join(s['name'] for s in doc['sweeps'])}"
    )
    return 0


def _window_len(adapter, requested: int) -> int:
    context = adapter.provenance.get("max_seq_len") or adapter.provenance.get("context_length")
    return min(requested, int(context)) if context else requested


def run_ablate(args: argparse.Namespace) -> int:
    from nnobs.core.results import load_result
    from nnobs.interventions.ablation import (
        ablate,
        corpus_windows,
        direction_intervention,
        fit_layer_probes,
        probe_from_observe,
    )
    from nnobs.interventions.targets import make_target

    adapter = _load(args)
    length = _window_len(adapter, args.window_len)
    out = Path(args.out)
    need_reference = args.mode == "mean" or args.later_probes
    reference, reference_info = (
        corpus_windows(
            adapter.tokenizer, args.corpus, args.reference_split, args.reference_windows, length
        )
        if need_reference
        else (None, None)
    )
    if args.direction_from:
        if args.task:
            raise NnobsError("--direction-from measures loss on corpus windows: drop --task")
        layer, direction = probe_from_observe(load_result(args.direction_from))
        windows, _ = corpus_windows(
            adapter.tokenizer, args.corpus, args.split, args.windows, length
        )
        later = list(range(layer + 1, adapter.n_layers))
        probes = (
            fit_layer_probes(adapter, later, reference) if args.later_probes and later else None
        )
        doc = direction_intervention(
            adapter,
            layer,
            direction,
            windows,
            mode=args.direction_mode,
            factor=args.factor,
            probes=probes,
            seed=args.seed,
            n_boot=args.n_boot,
            batch_size=args.batch_size,
        )
        path = _write(doc, out / "direction.json")
        loss = doc["direction"]["loss"]
        print(
            f"{path}: layer {layer} {args.direction_mode}: loss {loss['base']:.4f} -> "
            f"{loss['ablated']:.4f} (delta {loss['delta']:+.4f})"
        )
        return 0
    if not args.site:
        raise NnobsError("give --site to ablate (or --direction-from an observe result)")
    target = make_target(
        adapter, args.site, positions=args.positions, heads=args.heads, neurons=args.neurons
    )
    task = _task(args, adapter, equal_length=False) if args.task else None
    windows = None
    if task is None:
        windows, _ = corpus_windows(
            adapter.tokenizer, args.corpus, args.split, args.windows, length
        )
    doc = ablate(
        adapter,
        target,
        args.mode,
        task=task,
        windows=windows,
        reference=reference,
        reference_info=reference_info,
        seed=args.seed,
        n_boot=args.n_boot,
        batch_size=args.batch_size,
    )
    path = _write(doc, out / "ablate.json")
    r = doc["ablation"]
    lo, hi = r["delta_ci95"]
    print(
        f"{path}: {args.mode} ablation of {args.site}: {r['measure']} {r['base']:.4f} -> "
        f"{r['ablated']:.4f} (delta {r['delta']:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}])"
    )
    return 0


def run_attribute(args: argparse.Namespace) -> int:
    from nnobs.interventions.attribution import attribute
    from nnobs.report.intervention_plots import attribution_plot

    adapter = _load(args)
    task = _task(args, adapter, equal_length=args.baseline == "corrupted")
    if args.items < 1:
        raise NnobsError(f"--items must be a positive integer, got {args.items}")
    doc = attribute(
        adapter,
        task,
        method=args.method,
        site=args.site,
        baseline=args.baseline,
        items=range(min(args.items, len(task))),
        steps=args.steps,
        rule=args.rule,
        tol=args.tol,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
    )
    out = Path(args.out)
    path = _write(doc, out / "attribute.json")
    attribution_plot(doc, out / "attribute.png")
    c = doc["completeness"]
    worst = f"{c['max_rel_error']:.2%}" if c["max_rel_error"] is not None else "n/a"
    print(
        f"{path}: {len(doc['items'])} items, completeness gap at most {worst} "
        f"({'within' if c['all_within_tol'] else 'NOT within'} {c['tol']:.0%})"
    )
    return 0
