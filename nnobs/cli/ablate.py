"""``nnobs ablate``: ablate a site, heads, neurons or a probe's direction on a frozen model.

Writes one JSON result (schema ``nnobs/core/schemas/interventions.schema.json``) into
``--out``: ablate.json, or direction.json for the causal test of a probe direction.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from nnobs.cli.common import (
    add_intervention_args,
    add_task_args,
    int_list,
    load_adapter,
    load_task_from_args,
    output_dir,
    subcommand,
)
from nnobs.core.errors import NnobsError

if TYPE_CHECKING:
    from nnobs.interventions.ablation import AblationSettings
    from nnobs.models.adapter import ModelAdapter

EPILOG = """\
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


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subcommand(
        subparsers,
        "ablate",
        help="ablate a site, heads, neurons or a direction; change in loss or task metric",
        description="Replace part of an activation by zero, its reference mean or another "
        "input's value, and report the change with a bootstrap interval over examples.",
        epilog=EPILOG,
    )
    add_intervention_args(parser)
    add_task_args(parser, required=False)
    parser.add_argument("--site", help="hook site, e.g. blocks.1.mlp_out or blocks.0.head_out")
    parser.add_argument("--heads", type=int_list, help="head indices (head_out), e.g. 0,3")
    parser.add_argument("--neurons", type=int_list, help="neuron indices (mlp_hidden)")
    parser.add_argument("--positions", type=int_list, help="positions (negative from the end)")
    parser.add_argument("--mode", choices=("zero", "mean", "resample"), default="zero")
    parser.add_argument("--corpus", default="stdlib", help="corpus for windows (default: stdlib)")
    parser.add_argument("--split", default="validation", help="split measured on")
    parser.add_argument(
        "--windows",
        type=int,
        default=32,
        help="number of corpus windows (with --direction-from: a budget of "
        "--windows x --window-len scored tokens, in windows within documents)",
    )
    parser.add_argument("--window-len", type=int, default=64, help="tokens per window")
    parser.add_argument("--reference-split", default="train", help="split the mean is taken on")
    parser.add_argument("--reference-windows", type=int, default=64, help="windows for the mean")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument(
        "--direction-from", metavar="JSON", help="an observe result: test its probe direction"
    )
    parser.add_argument(
        "--allow-other-model",
        action="store_true",
        help="apply a --direction-from probe whose provenance names another model",
    )
    parser.add_argument("--direction-mode", choices=("project_out", "scale"), default="project_out")
    parser.add_argument("--factor", type=float, default=0.0, help="scale factor (scale mode)")
    parser.add_argument(
        "--later-probes",
        action="store_true",
        help="fit probes at later layers (reference windows) and report their pcorr change",
    )
    parser.set_defaults(func=run)


def _window_len(adapter: ModelAdapter, requested: int) -> int:
    """--window-len, capped at the model's context length where the model states one."""
    context = adapter.context_length
    return min(requested, int(context)) if context else requested


def run(args: argparse.Namespace) -> int:
    from nnobs.data.windows import stream_windows

    output_dir(args.out)
    adapter = load_adapter(args)
    length = _window_len(adapter, args.window_len)
    if args.direction_from:
        return _run_direction(args, adapter, length)
    reference, reference_info = (
        stream_windows(
            adapter.tokenizer, args.corpus, args.reference_split, args.reference_windows, length
        )
        if args.mode == "mean"
        else (None, None)
    )
    return _run_site(args, adapter, length, reference, reference_info)


def _settings(args: argparse.Namespace) -> AblationSettings:
    """The ablation's knobs from the command line."""
    from nnobs.interventions.ablation import AblationSettings

    return AblationSettings(seed=args.seed, n_boot=args.n_boot, batch_size=args.batch_size)


def _run_direction(args: argparse.Namespace, adapter: ModelAdapter, length: int) -> int:
    """--direction-from: project out (or scale) an observe result's probe direction."""
    from nnobs.core.results import load_result, write_result
    from nnobs.interventions.direction import (
        direction_intervention,
        direction_windows,
        fit_layer_probes,
        other_model,
        probe_from_observe,
    )

    if args.task:
        raise NnobsError("--direction-from measures loss on corpus windows: drop --task")
    observed = load_result(args.direction_from, "nnobs.observe")
    difference = other_model(observed, adapter)
    if difference and not args.allow_other_model:
        raise NnobsError(
            f"--direction-from {args.direction_from} holds a probe of another model "
            f"({difference}): observe {args.model} and use that result, or pass "
            "--allow-other-model to apply it anyway"
        )
    layer, direction = probe_from_observe(observed)
    tok = adapter.tokenizer
    windows = direction_windows(tok, args.corpus, args.split, args.windows, length)
    later = list(range(layer + 1, adapter.n_layers))
    probes = None
    if args.later_probes and later:
        split, n_windows = args.reference_split, args.reference_windows
        reference = direction_windows(tok, args.corpus, split, n_windows, length)
        probes = fit_layer_probes(adapter, later, reference, args.batch_size)
    result = direction_intervention(
        adapter,
        layer,
        direction,
        windows,
        _settings(args),
        mode=args.direction_mode,
        factor=args.factor,
        probes=probes,
    )
    path = write_result(Path(args.out) / "direction.json", result)
    loss = result["direction"]["loss"]
    print(
        f"{path}: layer {layer} {args.direction_mode}: loss {loss['base']:.4f} -> "
        f"{loss['ablated']:.4f} (delta {loss['delta']:+.4f})"
    )
    return 0


def _run_site(
    args: argparse.Namespace, adapter: ModelAdapter, length: int, reference, reference_info
) -> int:
    """--site: ablate a site (or some of its heads, neurons, positions) on a task or windows."""
    from nnobs.core.results import write_result
    from nnobs.data.windows import stream_windows
    from nnobs.interventions.ablation import ablate
    from nnobs.interventions.targets import make_target

    if not args.site:
        raise NnobsError("give --site to ablate (or --direction-from an observe result)")
    target = make_target(
        adapter, args.site, positions=args.positions, heads=args.heads, neurons=args.neurons
    )
    task = load_task_from_args(args, adapter, equal_length=False) if args.task else None
    windows = None
    if task is None:
        windows, _ = stream_windows(
            adapter.tokenizer, args.corpus, args.split, args.windows, length
        )
    result = ablate(
        adapter,
        target,
        args.mode,
        _settings(args),
        task=task,
        windows=windows,
        reference=reference,
        reference_info=reference_info,
    )
    path = write_result(Path(args.out) / "ablate.json", result)
    r = result["ablation"]
    lo, hi = r["delta_ci95"]
    print(
        f"{path}: {args.mode} ablation of {args.site}: {r['measure']} {r['base']:.4f} -> "
        f"{r['ablated']:.4f} (delta {r['delta']:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}])"
    )
    return 0
