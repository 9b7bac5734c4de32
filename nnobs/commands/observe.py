"""``nnobs observe``: the decision-quality observability protocol on one model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """\
examples:
  nnobs observe --model runs/default
  nnobs observe --model runs/default --corpus path/to/code --domain2 none
  nnobs observe --model ./my-hf-checkpoint --ex-per-dim 1000 --device cuda
  nnobs observe --model gpt2 --layers 0,4,8      (a hub name, if it is cached locally)

The model is an nnobs run directory (its latest checkpoint), an nnobs checkpoint directory,
or a Hugging Face causal LM by local path or hub name. Writes OUT/observe.json (schema:
nnobs/schemas/observe.schema.json) and OUT/layer_profile.png, and prints a summary.
pcorr is the partial Spearman correlation between a linear probe's score and next-token
loss, controlling for max softmax and the activation norm: signal that output confidence
does not expose."""


def _int_list(text: str) -> list[int]:
    try:
        if "-" in text and "," not in text:
            lo, hi = (int(x) for x in text.split("-"))
            return list(range(lo, hi + 1))
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers like 0,2,5 or 43-49, got {text!r}"
        ) from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "observe",
        help="measure where a model keeps a decision-quality signal its confidence hides",
        description="Run the observability protocol on a frozen causal LM: layer sweep, "
        "multi-seed evaluation, held-out test, output-controlled residual, control "
        "sensitivity, baselines, detection floor, flagging and cross-domain transfer.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, metavar="PATH|NAME", help="model to observe")
    parser.add_argument(
        "--corpus",
        default="stdlib",
        help="corpus spec: stdlib, a path, or hf:NAME (default: stdlib)",
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
    parser.add_argument("--layers", type=_int_list, help="layers to sweep (default: all)")
    parser.add_argument(
        "--seeds", type=_int_list, default=list(range(43, 50)), help="probe seeds (43-49)"
    )
    parser.add_argument("--seq-len", type=int, help="window length (default: min(context, 256))")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for CIs")
    parser.add_argument(
        "--no-random-init-floor",
        action="store_true",
        help="skip the random-init model in the detection floor (random heads only)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, … (default: cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nnobs.protocol import ObserveSettings, observe_model
    from nnobs.summary import observe_summary

    settings = ObserveSettings(
        ex_per_dim=args.ex_per_dim,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        layers=args.layers,
        seeds=args.seeds,
        n_boot=args.n_boot,
        random_init_floor=not args.no_random_init_floor,
    )
    model_path = Path(args.model)
    if args.out:
        out = Path(args.out)
    elif model_path.exists():
        out = model_path / "observe"
    else:
        out = Path("runs") / f"observe-{args.model.replace('/', '--')}"
    domain2 = None if args.domain2 == "none" else args.domain2
    doc = observe_model(
        args.model,
        args.corpus,
        domain2=domain2,
        out_dir=out,
        settings=settings,
        device=args.device,
        progress=not args.no_progress,
        log=lambda msg: print(f"· {msg}", file=sys.stderr),
    )
    print(observe_summary(doc))
    print(f"\nwrote {out / 'observe.json'} and {out / 'layer_profile.png'}")
    return 0
