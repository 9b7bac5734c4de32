"""``nnobs drift``: how a site's features changed between a run and its fine-tuned descendant.

Writes into ``--out``: drift.json (schema ``nnobs/core/schemas/drift.schema.json``) and
index.html; with --train-sae also sae_before/, sae_after/ and sae_before_seed2/ (SAELens
format; the last is the seed-to-seed baseline of the matching).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nnobs.cli.common import output_dir, require_tokenizer, subcommand
from nnobs.core.errors import NnobsError

if TYPE_CHECKING:
    from nnobs.data.windows import Windows
    from nnobs.models.adapter import ModelAdapter

EPILOG = """\
examples:
  nnobs finetune runs/default --steps 200 --out runs/default-tests
  nnobs drift --before runs/default --after runs/default-tests --site blocks.1.mlp_hidden \\
      --out out/drift
  nnobs drift --before runs/default --after runs/default-tests --site blocks.2.resid_post \\
      --train-sae --out out/drift-sae
  nnobs drift --before A --after B --site blocks.2.resid_post --sae-before SA --sae-after SB \\
      --out out/drift

An mlp_hidden site's neurons are matched by activation correlation on the same tokens. With
SAEs (--sae-before/--sae-after, or --train-sae to train one per model) their features are
matched by decoder cosine (Hungarian; matched at cosine >= 0.7); a feature vanished (or
appeared) when its best match in the other SAE is below the 5% quantile of best matches
between two SAEs of the base model from different seeds (--train-sae trains that second one;
given SAEs fall back to cosine 0.7, with no rate expected under a null). The base SAE is
spliced into the fine-tuned model, and the vanished and appeared features get dashboards.
Every layer's CKA before vs after, and the decision-quality protocol on both models
(--ex-per-dim tokens per dimension; --no-observe skips it) complete the report. The
signal's change is a paired test: the difference of the two headlines with an interval over
the test documents (the same documents resampled for both models) and the probes' training
(their seeds), a two-sided p-value at --level, and a verdict: fell or rose (changed), kept
(not changed, and the interval within --kept-margin of 0) or unclear (too uncertain to
tell)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subcommand(
        subparsers,
        "drift",
        help="feature drift between a run and its fine-tuned descendant",
        description="Match neurons and SAE features of a site before and after fine-tuning, "
        "splice the base SAE into the fine-tuned model, CKA per layer, and the "
        "decision-quality signal before vs after.",
        epilog=EPILOG,
    )
    parser.add_argument("--before", required=True, metavar="RUN", help="the base model")
    parser.add_argument("--after", required=True, metavar="RUN", help="the fine-tuned model")
    parser.add_argument("--site", required=True, help="hook site, e.g. blocks.1.mlp_hidden")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory for the results")
    parser.add_argument("--sae-before", metavar="DIR", help="SAE of the base model at --site")
    parser.add_argument("--sae-after", metavar="DIR", help="SAE of the fine-tuned model")
    parser.add_argument("--train-sae", action="store_true", help="train an SAE on each model")
    parser.add_argument("--corpus", default="stdlib", help="corpus (default: stdlib)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens compared on")
    parser.add_argument("--window-len", type=int, default=64, help="tokens per window")
    parser.add_argument("--sae-tokens", type=int, default=100_000, help="SAE training tokens")
    parser.add_argument("--expansion", type=int, default=8, help="SAE width / site width")
    parser.add_argument("--k", type=int, default=16, help="active SAE features per token")
    parser.add_argument("--n-dashboards", type=int, default=8, help="vanished/appeared shown")
    parser.add_argument("--ex-per-dim", type=int, default=50, help="protocol tokens per dim")
    parser.add_argument("--no-observe", action="store_true", help="skip the protocol")
    parser.add_argument(
        "--level", type=float, default=0.05, help="level of the signal-change test (0.05)"
    )
    parser.add_argument(
        "--kept-margin", type=float, default=0.05,
        help="pcorr change within which the signal counts as kept (0.05)",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling and bootstrap")
    parser.set_defaults(func=run)


def _models(args: argparse.Namespace) -> tuple[ModelAdapter, ModelAdapter]:
    from nnobs.features.drift import check_same_tokenizer
    from nnobs.features.stream import site_width
    from nnobs.models.load import load_model

    models = [
        require_tokenizer(load_model(p, device=args.device), p) for p in (args.before, args.after)
    ]
    check_same_tokenizer(*models)
    widths = [site_width(m, args.site) for m in models]
    if widths[0] != widths[1]:
        raise NnobsError(f"{args.site} is {widths[0]} wide before and {widths[1]} after")
    return models[0], models[1]


def _saes(args: argparse.Namespace, models, out: Path) -> list | None:
    """The base and fine-tuned SAEs (loaded, or trained and saved, then with a second base SAE
    of another seed), or None."""
    from nnobs.features.sae import check_sae_fits, load_sae
    from nnobs.features.stream import budget_windows, site_width
    from nnobs.features.train_sae import budget_settings, train_site_sae

    if bool(args.sae_before) != bool(args.sae_after):
        raise NnobsError("give both --sae-before and --sae-after (or --train-sae)")
    if args.sae_before and args.train_sae:
        raise NnobsError("give SAE directories or --train-sae, not both")
    if args.sae_before:
        saes = [load_sae(args.sae_before), load_sae(args.sae_after)]
        for sae, model in zip(saes, models, strict=True):
            check_sae_fits(sae, args.site, site_width(model, args.site))
        return saes
    if not args.train_sae:
        return None
    # The fine-tuned model's SAE and a second SAE of the base model start from another seed
    # than the base SAE: matches then come from the activations, not from a shared start, and
    # the base-vs-base match rate is the level drift is read against.
    saes = []
    for name, model, seed in (("before", models[0], args.seed), ("after", models[1], args.seed + 1),
                              ("before", models[0], args.seed + 1)):  # fmt: skip
        settings = budget_settings(args.sae_tokens, expansion=args.expansion, k=args.k, seed=seed)
        windows = budget_windows(model, args.corpus, "train", args.sae_tokens, args.window_len)
        sae = train_site_sae(model, args.site, windows, settings, args.batch_size).sae_
        sae.metadata.update(model_name=str(getattr(args, name)))
        saes.append(sae)
    for name, sae in zip(("sae_before", "sae_after", "sae_before_seed2"), saes, strict=True):
        sae.save(out / name)
    return saes


def _sae_drift(args, models, saes, windows: Windows, held_out: Windows) -> dict[str, Any]:
    from nnobs.features.dashboard import DashboardSettings, feature_dashboards
    from nnobs.features.drift import decoder_matching, sae_transfer
    from nnobs.features.sources import SAESource, SubsetSource

    matching = decoder_matching(saes[0], saes[1], null=saes[2] if len(saes) == 3 else None)
    baseline = None
    if len(saes) == 3:
        seeds = decoder_matching(saes[0], saes[2])
        baseline = {k: seeds[k] for k in ("fraction_matched", "median", "threshold")}
    settings = DashboardSettings(n_ablate=0, batch_size=args.batch_size, seed=args.seed)
    cards = {}
    for key, model, sae in (("vanished", models[0], saes[0]), ("appeared", models[1], saes[1])):
        chosen = matching[key][: args.n_dashboards]
        source = SubsetSource(SAESource(sae), chosen) if chosen else None
        body = feature_dashboards(model, source, windows, settings) if source else None
        cards[key] = body["features"] if body else []
    transfer = sae_transfer(
        models[1], saes[0], saes[1], held_out, batch_size=args.batch_size, n_boot=args.n_boot
    )
    return {"matching": matching, "seed_baseline": baseline, "transfer": transfer,
            "dashboards": cards}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from nnobs.core.results import write_result
    from nnobs.data.corpus import load_corpus
    from nnobs.features import drift
    from nnobs.features.signal_change import check_change_settings
    from nnobs.features.stream import budget_windows
    from nnobs.interventions.ablation import windows_info
    from nnobs.models.adapter import provenance
    from nnobs.models.sites import site_kind
    from nnobs.observe.settings import ObserveSettings
    from nnobs.report.drift_page import render_drift

    check_change_settings(args.level, args.kept_margin)
    out = output_dir(args.out)
    models = _models(args)
    if site_kind(args.site) != "mlp_hidden" and not (args.train_sae or args.sae_before):
        raise NnobsError(
            f"{args.site} has no neurons to match: use an mlp_hidden site, or give SAEs "
            "(--sae-before/--sae-after or --train-sae)"
        )
    windows = budget_windows(models[0], args.corpus, "validation", args.tokens, args.window_len)
    held_out = budget_windows(models[0], args.corpus, "test", args.tokens, args.window_len)
    neurons = None
    if site_kind(args.site) == "mlp_hidden":
        corr = drift.activation_correlation(*models, windows, args.site, args.batch_size)
        neurons = drift.neuron_drift(corr)
    decision = None
    if not args.no_observe:
        settings = ObserveSettings(ex_per_dim=args.ex_per_dim, n_boot=args.n_boot)
        decision = drift.decision_signal(
            *models, load_corpus(args.corpus), settings, level=args.level, margin=args.kept_margin
        )
    saes = _saes(args, models, out)
    doc = {
        "schema": "nnobs.drift",
        "schema_version": 2,
        "provenance": {"before": provenance(models[0]), "after": provenance(models[1])},
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "site": args.site,
        "corpus": {"spec": args.corpus, "split": "validation", **windows_info(windows)},
        "neurons": neurons,
        "sae": _sae_drift(args, models, saes, windows, held_out) if saes else None,
        "cka": drift.cka_per_layer(*models, windows, args.batch_size),
        "decision": decision,
    }
    path = write_result(out / "drift.json", doc)
    page = render_drift(doc, out)
    print(f"{path}: drift of {args.site}; {page}")
    return 0
