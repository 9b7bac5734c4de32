"""``nnobs routing``: routing mass against causal importance in routed-residual models.

Writes ``routing.json`` (schema ``nnobs/core/schemas/routing.schema.json``) and
``report/index.html`` (with its plot) into ``--out``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from nnobs.cli.common import output_dir, require_tokenizer, subcommand
from nnobs.core.errors import NnobsError

EPILOG = """\
examples:
  nnobs routing --model runs/attnres --out out/routing
  nnobs routing --model runs/attnres --model runs/default --wrap-blocks 2 --out out/routing
  nnobs routing --model path/to/qwen3 --wrap-blocks 4 --windows 64 --out out/qwen

A model trained with model.residual = "attnres" is analysed as it is. A vanilla model
(pre-norm, plain residual sum; nnobs or a Llama/Qwen-kind Hugging Face model) is analysed
under a recency-bias wrap with --wrap-blocks blocks: its outputs stay those of the vanilla
model (the largest logit difference is reported) and its routing weights are fixed.
Source families: embedding, current block, older history. For each family x sublayer x depth
band: mean routing mass, and the change in loss and KL when the family is masked out of the
softmax or fixed to its corpus-mean weight, with bootstrap intervals over documents. Several
--model options are analysed on the same documents and shown side by side."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subcommand(
        subparsers,
        "routing",
        help="routing mass vs causal importance of routed residuals (trained or wrapped)",
        description="Measure routing mass and the causal effect of masking or fixing each "
        "source family of a routed-residual model, with intervals over documents.",
        epilog=EPILOG,
    )
    parser.add_argument(
        "--model", action="append", required=True, help="nnobs run or checkpoint, or a HF "
        "model path (repeatable: models side by side)",
    )  # fmt: skip
    parser.add_argument("--out", required=True, metavar="DIR", help="directory for the results")
    parser.add_argument(
        "--wrap-blocks", type=int, metavar="N", help="wrap vanilla models in N routing blocks"
    )
    parser.add_argument("--recency", type=float, default=2.0, help="wrap's recency bias logit")
    parser.add_argument("--corpus", default="stdlib", help="corpus for windows (default: stdlib)")
    parser.add_argument("--split", default="validation", help="split measured on")
    parser.add_argument("--windows", type=int, default=32, help="number of windows")
    parser.add_argument("--window-len", type=int, default=64, help="tokens per window")
    parser.add_argument("--bands", type=int, default=2, help="depth bands (default: 2)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="seed for windows and bootstrap")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--step", type=int, help="checkpoint step of nnobs runs (default: last)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _settings(args: argparse.Namespace):
    from nnobs.routing.result import RoutingSettings

    for name in ("windows", "window_len", "n_boot", "batch_size", "bands"):
        low = 2 if name in ("window_len", "n_boot") else 1
        if getattr(args, name) < low:
            flag = "--" + name.replace("_", "-")
            raise NnobsError(f"{flag} must be at least {low}, got {getattr(args, name)}")
    if not math.isfinite(args.recency):
        raise NnobsError(f"--recency must be a finite number, got {args.recency}")
    return RoutingSettings(
        corpus=args.corpus, split=args.split, windows=args.windows, window_len=args.window_len,
        bands=args.bands, n_boot=args.n_boot, seed=args.seed, batch_size=args.batch_size,
        wrap_blocks=args.wrap_blocks, recency=args.recency,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from nnobs.core.files import check_output_dir
    from nnobs.core.results import load_result, write_result
    from nnobs.data.corpus import load_corpus
    from nnobs.data.windows import document_windows
    from nnobs.models.load import load_model
    from nnobs.report.routing_page import render_routing
    from nnobs.routing.result import analyse_model, routing_document
    from nnobs.routing.wrap import check_blocks, routing_blocks

    out = output_dir(args.out)
    settings = _settings(args)
    adapters = [
        require_tokenizer(load_model(spec, device=args.device, step=args.step), spec)
        for spec in args.model
    ]
    for adapter in adapters:  # refuse before any measuring: no routing and no wrap, bad blocks
        if (
            settings.wrap_blocks is None
            or adapter.provenance.get("config", {}).get("residual") == "attnres"
        ):
            routing_blocks(adapter)
        else:
            check_blocks(adapter.n_layers, settings.wrap_blocks)
    docs = load_corpus(settings.corpus).split(settings.split)
    entries = []
    for spec, adapter in zip(args.model, adapters, strict=True):
        length = min(settings.window_len, adapter.context_length or settings.window_len)
        budget = settings.windows * length
        windows = document_windows(
            docs, adapter.tokenizer, length, budget, seed=settings.seed, split=settings.split
        )
        label = Path(spec).name or spec
        entries.append(analyse_model(adapter, label, windows, settings, not args.no_progress))
    info = {"corpus": settings.corpus, "split": settings.split, "n_documents_available": len(docs)}
    path = write_result(out / "routing.json", routing_document(entries, settings, info))
    report = check_output_dir(out / "report", "the report directory")
    page = render_routing(load_result(path, "nnobs.routing"), report)
    print(f"wrote {path} and {page}")
    return 0
