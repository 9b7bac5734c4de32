"""``nnobs observe``: the decision-quality observability protocol on one model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nnobs.cli.common import int_list, output_dir, require_tokenizer, subcommand
from nnobs.core.rundir import RunDir

EPILOG = """\
examples:
  nnobs observe --model runs/default
  nnobs observe --model runs/default --corpus path/to/code --domain2 none
  nnobs observe --model ./my-hf-checkpoint --ex-per-dim 1000 --device cuda
  nnobs observe --model gpt2 --layers 0,4,8      (a hub name, if it is cached locally)
  nnobs observe --model runs/default --all-checkpoints      (every checkpoint: a trajectory)

The model is an nnobs run directory (its latest checkpoint), an nnobs checkpoint directory,
or a Hugging Face causal LM by local path or hub name. Writes OUT/observe.json (schema:
nnobs/core/schemas/observe.schema.json) and OUT/layer_profile.png, and prints a summary.
pcorr is the partial Spearman correlation between a linear probe's score and next-token
loss, controlling for max softmax and the activation norm: signal that output confidence
does not expose.

With --all-checkpoints the model must be an nnobs run directory: every checkpoint is measured
on the same tokens with the protocol's tracked subset (layer profile with bootstrap CIs,
best-layer multi-seed pcorr, output-controlled residual), plus the detection floor, CKA to the
last checkpoint and the collapse verdict once per run. Writes OUT/trajectory.json (default
RUN/trajectory; schema nnobs/core/schemas/trajectory.schema.json); nnobs report RUN renders it."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subcommand(
        subparsers,
        "observe",
        help="measure where a model keeps a decision-quality signal its confidence hides",
        description="Run the observability protocol on a frozen causal LM: layer sweep, "
        "multi-seed evaluation, held-out test, output-controlled residual, control "
        "sensitivity, baselines, detection floor, flagging and cross-domain transfer.",
        epilog=EPILOG,
    )
    parser.add_argument("--model", required=True, metavar="PATH|NAME", help="model to observe")
    parser.add_argument(
        "--corpus",
        help="corpus spec: stdlib, a path, or hf:NAME (default: stdlib; with "
        "--all-checkpoints the run's own training corpus)",
    )
    parser.add_argument(
        "--domain2",
        default="auto",
        help="second domain for cross-domain transfer: a corpus spec, 'none', or 'auto' "
        "(stdlib-tests when the corpus is stdlib)",
    )
    parser.add_argument("--out", metavar="DIR", help="output directory (default: MODEL/observe)")
    parser.add_argument(
        "--ex-per-dim", type=int, default=350, help="token budget per split, × d_model (350)"
    )
    parser.add_argument("--layers", type=int_list, help="layers to sweep (default: all)")
    parser.add_argument(
        "--seeds", type=int_list, help="probe seeds (43-49; 43-45 with --all-checkpoints)"
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        help="window length (default: min(context, 256); min(context, 512) with "
        "--sampling reference)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    parser.add_argument(
        "--n-boot", type=int, help="bootstrap resamples for CIs (1000; 200 with --all-checkpoints)"
    )
    parser.add_argument(
        "--null-models",
        type=int,
        default=1,
        help="random-init models of the same architecture (one init seed each) that make the "
        "verdict's null (1; 3 or more also measure how much init seeds differ; 0 skips the "
        "null and the verdict)",
    )
    parser.add_argument(
        "--label",
        choices=["reference", "rank"],
        default="reference",
        help="the probe's target: the sign of the reference method's OLS residual of loss on "
        "raw max softmax and norm (reference, the default), or of the rank residual pcorr "
        "correlates (rank); the result records the headline under both",
    )
    parser.add_argument(
        "--sampling",
        choices=["spread", "reference"],
        default="spread",
        help="token windows: random spans over every document (spread), or the reference "
        "method's openings (first <= 512 tokens) of the shortest documents (reference)",
    )
    parser.add_argument("--level", type=float, default=0.05, help="the verdict's test level (0.05)")
    parser.add_argument(
        "--all-checkpoints",
        action="store_true",
        help="observe every checkpoint of an nnobs run (a trajectory over training)",
    )
    parser.add_argument(
        "--attributes",
        action="store_true",
        help="with --all-checkpoints: also probe Python token attributes per layer (slower)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, … (default: cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nnobs.models.load import load_model
    from nnobs.observe.protocol import observe_model
    from nnobs.observe.settings import ObserveSettings
    from nnobs.report.plots import layer_profile
    from nnobs.report.summary import observe_summary

    if args.all_checkpoints:
        return run_trajectory(args)
    settings = ObserveSettings(
        ex_per_dim=args.ex_per_dim,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        layers=args.layers,
        seeds=list(range(43, 50)) if args.seeds is None else args.seeds,
        n_boot=1000 if args.n_boot is None else args.n_boot,
        null_models=args.null_models,
        label=args.label,
        sampling=args.sampling,
        level=args.level,
    )
    model_path = Path(args.model)
    if model_path.is_dir():
        default = RunDir(model_path).observe_dir
    else:
        default = Path("runs") / f"observe-{args.model.replace('/', '--')}"
    out = output_dir(args.out, default)
    domain2 = None if args.domain2 == "none" else args.domain2
    adapter = require_tokenizer(load_model(args.model, device=args.device), args.model)
    result = observe_model(
        adapter,
        args.corpus or "stdlib",
        domain2=domain2,
        out_dir=out,
        settings=settings,
        progress=not args.no_progress,
        log=lambda msg: print(f"· {msg}", file=sys.stderr),
    )
    layer_profile(result, out / "layer_profile.png")
    print(observe_summary(result))
    print(f"\nwrote {out / 'observe.json'} and {out / 'layer_profile.png'}")
    return 0


def run_trajectory(args: argparse.Namespace) -> int:
    from nnobs.observe.trajectory import TrajectorySettings, observe_run

    defaults = TrajectorySettings()
    settings = TrajectorySettings(
        ex_per_dim=args.ex_per_dim,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        layers=args.layers,
        seeds=defaults.seeds if args.seeds is None else args.seeds,
        n_boot=defaults.n_boot if args.n_boot is None else args.n_boot,
        attributes=args.attributes,
    )
    out = output_dir(args.out, RunDir(args.model).trajectory_dir)
    result = observe_run(
        args.model,
        corpus=args.corpus,
        settings=settings,
        out_dir=out,
        device=args.device,
        progress=not args.no_progress,
        log=lambda msg: print(f"· {msg}", file=sys.stderr),
    )
    collapse = result["collapse"] or {}
    for r in result["checkpoints"]:
        if r["status"] in ("observed", "shrunk"):
            best = r["best"]
            lo, hi = best["ensemble_ci95"]
            print(
                f"step {r['step']:>7}  best layer {best['layer']}  pcorr {best['ensemble']:+.3f} "
                f"[{lo:+.3f}, {hi:+.3f}]  val loss {r['val_loss'] or float('nan'):.3f}"
            )
        else:
            print(f"step {r['step']:>7}  {r['status']}: {r['note']}")
    floor = result["floor"] or {}
    if floor:
        print(
            f"\nnull (random-init, {floor['source']}) {floor['null_value']:+.3f} ± "
            f"{floor['null_sd']:.3f}; floor {floor['value']:+.3f} at level {floor['level']:g}"
        )
    else:
        print("\nno random-init null: no verdict")
    print(f"verdict: {collapse.get('verdict', 'n/a')} — {collapse.get('reason', '')}")
    print(f"wrote {out / 'trajectory.json'} (render it with: nnobs report {args.model})")
    return 0
