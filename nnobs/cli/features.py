"""``nnobs features``: dashboards of a site's features — MLP neurons, principal components, the
probe direction of an observe result, or the features of a sparse autoencoder (loaded from a
SAELens-format directory, or trained here and saved as one).

Writes into ``--out``: features.json (schema ``nnobs/core/schemas/features.schema.json``),
index.html (the dashboards, searchable by feature index) and, with --train-sae, sae/ (the
dictionary in SAELens's format: sae_weights.safetensors + cfg.json).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from nnobs.cli.common import load_adapter, output_dir, subcommand
from nnobs.core.errors import NnobsError

if TYPE_CHECKING:
    from nnobs.models.adapter import ModelAdapter

log = logging.getLogger("nnobs.features")

EPILOG = """\
examples:
  nnobs features --model runs/default --site blocks.1.mlp_hidden --out out/neurons
  nnobs features --model runs/default --site blocks.2.resid_post --train-sae --out out/sae2
  nnobs features --model runs/default --site blocks.2.resid_post --sae out/sae2/sae --out out/f
  nnobs features --model runs/default --site blocks.0.resid_post --pca 16 --out out/pca
  nnobs features --model runs/default --site blocks.0.resid_post --sae out/sae0/sae \\
      --decompose runs/default/observe/observe.json --out out/decision

Features: the neurons of an mlp_hidden site; --pca N principal components; --probe FILE
the probe direction of an observe result; --sae DIR a SAELens-format dictionary (nnobs's
or SAELens's, measured on this model: variance explained, L0, spliced-in loss);
--train-sae trains a TopK SAE on --sae-split first (streamed, bounded memory) and saves
it to OUT/sae. Dashboards come from one streamed pass over --tokens tokens of --split;
the densest --n-ablate features are mean-ablated on --ablate-tokens test tokens.
--decompose names the SAE features or neurons that make up an observe result's probe
direction (by cosine and by contribution to the probe's score)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subcommand(
        subparsers,
        "features",
        help="feature dashboards of a site: neurons, directions or SAE features",
        description="What each feature of a site responds to (top contexts, quantile samples, "
        "density) and what it does (promoted and suppressed tokens, loss when ablated).",
        epilog=EPILOG,
    )
    parser.add_argument("--model", required=True, help="nnobs run directory or HF model path")
    parser.add_argument("--site", required=True, help="hook site, e.g. blocks.1.resid_post")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory for the results")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--sae", metavar="DIR", help="a SAELens-format SAE directory")
    source.add_argument("--train-sae", action="store_true", help="train a TopK SAE first")
    source.add_argument("--pca", type=int, metavar="N", help="the top N principal components")
    source.add_argument("--probe", metavar="JSON", help="the probe direction of an observe result")
    parser.add_argument("--decompose", metavar="JSON", help="observe result: decompose its probe")
    parser.add_argument("--corpus", default="stdlib", help="corpus (default: stdlib)")
    parser.add_argument("--split", default="validation", help="split for the dashboards")
    parser.add_argument("--tokens", type=int, default=20_000, help="tokens for the dashboards")
    parser.add_argument("--window-len", type=int, default=64, help="tokens per window")
    parser.add_argument("--top-k", type=int, default=10, help="top contexts per feature")
    parser.add_argument("--n-ablate", type=int, default=16, help="features to mean-ablate")
    parser.add_argument("--ablate-tokens", type=int, default=4096, help="test tokens ablated on")
    parser.add_argument("--sae-split", default="train", help="split the SAE is trained on")
    parser.add_argument("--sae-tokens", type=int, default=200_000, help="SAE training tokens")
    parser.add_argument("--expansion", type=int, default=8, help="SAE width / site width")
    parser.add_argument("--k", type=int, default=16, help="active SAE features per token")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--step", type=int, help="checkpoint step of an nnobs run (default: last)")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling and bootstrap")
    parser.set_defaults(func=run)


def _windows(adapter: ModelAdapter, args: argparse.Namespace, split: str, tokens: int):
    from nnobs.features.stream import budget_windows

    return budget_windows(adapter, args.corpus, split, tokens, args.window_len, args.seed)


def _train_sae(adapter: ModelAdapter, args: argparse.Namespace, out: Path):
    """Train a TopK SAE on --sae-split, evaluate it on the test split, save it to OUT/sae."""
    from nnobs.features.sae_eval import evaluate_sae
    from nnobs.features.train_sae import budget_settings, train_site_sae

    settings = budget_settings(args.sae_tokens, expansion=args.expansion, k=args.k, seed=args.seed)
    windows = _windows(adapter, args, args.sae_split, args.sae_tokens)
    sae = train_site_sae(adapter, args.site, windows, settings, args.batch_size, True).sae_
    held_out = _windows(adapter, args, "test", args.ablate_tokens)
    metrics = evaluate_sae(adapter, sae, held_out, batch_size=args.batch_size, n_boot=args.n_boot)
    sae.metadata.update(
        model_name=str(args.model), context_size=held_out.seq_len, nnobs_metrics=metrics
    )
    sae.save(out / "sae")
    return sae, metrics


def _source(adapter: ModelAdapter, args: argparse.Namespace, out: Path):
    """The feature source the options name, and the SAE's metrics when one was trained."""
    from nnobs.core.results import load_result
    from nnobs.features import sources
    from nnobs.features.sae import load_sae
    from nnobs.features.sae_eval import evaluate_sae

    if args.train_sae:
        sae, metrics = _train_sae(adapter, args, out)
        return sources.sae_source(adapter, sae, args.site, str(out / "sae")), metrics
    if args.sae:  # measured on this model: the SAE may come from another checkpoint or tool
        source = sources.sae_source(adapter, load_sae(args.sae), args.site, args.sae)
        held_out = _windows(adapter, args, "test", args.ablate_tokens)
        metrics = evaluate_sae(
            adapter, source.sae, held_out, batch_size=args.batch_size, n_boot=args.n_boot
        )
        return source, metrics
    if args.pca is not None:
        windows = _windows(adapter, args, args.split, args.tokens)
        return sources.pca_source(adapter, windows, args.site, args.pca, args.batch_size), None
    if args.probe:
        source = sources.probe_source(load_result(args.probe, "nnobs.observe"))
        if source.site != args.site:
            raise NnobsError(f"the probe reads {source.site}: give --site {source.site}")
        return source, None
    return sources.neuron_source(adapter, args.site), None


def _probe(path: str, site: str) -> tuple[str, object]:
    """The probe (site, direction) of an observe result, refused unless features at ``site``
    can make it up."""
    from nnobs.core.results import load_result
    from nnobs.features.decision import check_reaches
    from nnobs.features.sources import probe_direction

    probe_site, _, direction = probe_direction(load_result(path, "nnobs.observe"))
    check_reaches(site, probe_site)
    return probe_site, direction


def run(args: argparse.Namespace) -> int:
    from nnobs.core.results import write_result
    from nnobs.features.dashboard import DashboardSettings, feature_dashboards
    from nnobs.features.decision import probe_contributors
    from nnobs.interventions.ablation import windows_info
    from nnobs.models.adapter import provenance
    from nnobs.report.features_page import render_features

    out = output_dir(args.out)
    adapter = load_adapter(args)
    adapter.resolve(args.site)
    probe = _probe(args.decompose, args.site) if args.decompose else None
    settings = DashboardSettings(
        top_k=args.top_k,
        n_ablate=args.n_ablate,
        batch_size=args.batch_size,
        n_boot=args.n_boot,
        seed=args.seed,
    )
    windows = _windows(adapter, args, args.split, args.tokens)
    ablate_windows = _windows(adapter, args, "test", args.ablate_tokens) if args.n_ablate else None
    source, sae_metrics = _source(adapter, args, out)
    body = feature_dashboards(adapter, source, windows, settings, ablate_windows, progress=True)
    decision = None
    if probe is not None:
        means = [f["mean"] for f in body["features"]]
        found = probe_contributors(adapter, source, means, *probe)
        decision = {**found, "observe": str(args.decompose)}
    corpus = {"spec": args.corpus, "split": args.split, **windows_info(windows)}
    doc = {
        "schema": "nnobs.features",
        "schema_version": 1,
        "provenance": provenance(adapter),
        "site": args.site,
        "corpus": corpus,
        "sae_metrics": sae_metrics,
        "decision": decision,
        **body,
    }
    path = write_result(out / "features.json", doc)
    page = render_features(doc, out)
    alive = sum(f["density"] > 0 for f in body["features"])
    print(f"{path}: {source.n_features} features at {args.site}, {alive} active; {page}")
    return 0
