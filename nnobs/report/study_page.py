"""The study page: the study's question answered from its verdicts, the verdict table, the
comparison across variants, then one section per variant with its figures and runs."""

from __future__ import annotations

from pathlib import Path

from nnobs.report import plots
from nnobs.report.page import Page, escape, interval, number, verdict_span


def variant_verdict_text(v: dict) -> str:
    """One sentence on what happened to the signal in this variant, with its numbers."""
    return _verdict_sentence(v) + _unlearned(v)


def _unlearned(v: dict) -> str:
    """A warning when the variant's models never got past token frequencies: whatever its
    probes read, it is not a trained model's signal."""
    loss, unigram = v["final_val_loss"]["mean"], v.get("unigram_loss")
    if loss is None or unigram is None or loss < unigram - 0.05:
        return ""
    return (
        f" Its models did not learn beyond token frequencies (validation loss {loss:.3f}, "
        f"unigram baseline {unigram:.3f})."
    )


def _verdict_sentence(v: dict) -> str:
    final, runs, verdict = v["final_pcorr"], v["runs"], v["verdict"]
    n, counts = len(runs), v["verdict_counts"]
    floor = f"floor {v['floor']:.3f}" if v.get("floor") is not None else "no floor"
    numbers = f"final pcorr {number(final['mean'])} {interval(final['ci95'])} ({floor})"
    if verdict == "retained":
        return f"Keeps the signal in {counts['retained']}/{n} seeds: {numbers}."
    if verdict == "erased":
        erased = [r for r in runs if r["collapse"]["verdict"] == "erased"]
        where = "; ".join(
            f"seed {r['seed']}: layer {r['collapse']['layer']}, peak at step "
            f"{r['collapse']['peak_step']}, at the floor from step {r['collapse']['collapse_step']}"
            for r in erased
        )
        return (
            f"Signal formed and was erased while the validation loss kept improving in "
            f"{counts['erased']}/{n} seeds ({where}); {numbers}."
        )
    if verdict == "never_formed":
        return (
            f"The signal never rose above the detection floor "
            f"({counts['never_formed']}/{n} seeds); {numbers}."
        )
    if verdict == "fell_with_loss":
        return f"The signal fell as the validation loss rose (not a collapse); {numbers}."
    if verdict == "inconclusive":
        return (
            f"The signal formed but ends neither above the random-init null nor clearly below "
            f"its peak ({counts['inconclusive']}/{n} seeds); {numbers}."
        )
    spread = ", ".join(f"{k.replace('_', ' ')} {c}" for k, c in counts.items())
    return f"Seeds disagree ({spread}); {numbers}."


def _answer(study: dict) -> str:
    """The study's question answered in two sentences from its verdicts and effects."""
    keep = [v["name"] for v in study["variants"] if v["verdict"] == "retained"]
    lose = [v["name"] for v in study["variants"] if v["verdict"] != "retained"]
    ranked = sorted(study["variants"], key=lambda v: -(v["final_pcorr"]["mean"] or -1))
    order = " > ".join(f"{v['name']} ({number(v['final_pcorr']['mean'])})" for v in ranked)
    sure = [e for e in study["effects"] if e["metric"] == "final_pcorr" and e["excludes_zero"]]
    parts = [
        f"Keep the signal at the end of training: {', '.join(keep) or 'none'}; "
        f"do not: {', '.join(lose) or 'none'}.",
        f"Final pcorr, highest first: {order}.",
    ]
    if sure:
        parts.append(
            "Differences from the baseline whose 95% interval excludes zero: "
            + "; ".join(
                f"{e['variant']} {number(e['difference'])} {interval(e['ci95'])}" for e in sure
            )
            + "."
        )
    else:
        parts.append(
            f"No variant's final pcorr differs from {study['baseline']} with a 95% interval "
            f"that excludes zero at {len(study['config']['seeds'])} seeds."
        )
    return " ".join(parts)


def render_study(study: dict, out: Path) -> Path:
    """The study page: the answer, the verdict table, the comparison, then one section per
    variant."""
    page = Page(out, f"nnobs study: {study['name']}")
    _study_answer(page, study)
    _study_verdicts(page, study)
    _study_comparison(page, study)
    for variant in study["variants"]:
        _variant_section(page, variant)
    return page.write()


def _study_answer(page: Page, study: dict) -> None:
    seeds, controls = study["config"]["seeds"], study["controls"]
    question = study.get("question") or "Which variants keep the signal?"
    page.add(
        f"<p>{escape(study.get('description', ''))}</p>"
        f'<div class="answer"><b>{escape(question)}'
        f"</b><br>{escape(_answer(study))}</div>"
        f'<p class="meta">{len(study["variants"])} variants × {len(seeds)} training seeds '
        f"({', '.join(map(str, seeds))}); {escape(controls['data_order'])}; training seeds "
        f"{escape(controls['training_seeds'])}. Statistic: "
        f"{escape(controls['statistic'])}. Numbers: <code>study.json</code>.</p>"
    )


def _study_verdicts(page: Page, study: dict) -> None:
    page.add("<h2>Verdicts</h2>")
    effects = {e["variant"]: e for e in study["effects"] if e["metric"] == "final_pcorr"}
    rows = []
    for v in study["variants"]:
        e = effects.get(v["name"])
        rows.append(
            [
                escape(v["name"]),
                f"{v['n_params']:,}",
                f"{number(v['final_pcorr']['mean'])} {interval(v['final_pcorr']['ci95'])}",
                "baseline" if e is None else f"{number(e['difference'])} {interval(e['ci95'])}",
                f"{number(v['final_oc_pcorr']['mean'])}",
                f"{number(v['peak_pcorr']['mean'])}",
                number(v["final_val_loss"]["mean"], 3, sign=False),
                verdict_span(v["verdict"]),
                escape(variant_verdict_text(v)),
            ]
        )
    page.table(
        [
            "variant",
            "params",
            "final pcorr [95% CI]",
            f"vs {study['baseline']} [Welch 95% CI]",
            "output-controlled",
            "peak pcorr",
            "val loss",
            "verdict",
            "what happened",
        ],
        rows,
        numeric={1, 4, 5, 6},
    )


def _study_comparison(page: Page, study: dict) -> None:
    page.add("<h2>Comparison</h2>")
    page.figure(
        "study_comparison",
        lambda p: plots.study_comparison(study, p),
        "Left: final pcorr per variant (grey dots: training seeds; diamond: mean with 95% "
        "t-interval; red bar: detection floor). Right: difference from the baseline with a "
        "Welch 95% interval. Data: study.json variants[].final_pcorr and effects[].",
    )
    page.figure(
        "study_curves",
        lambda p: plots.study_curves(study, p),
        "Best-layer pcorr over training (mean of seeds, 95% t-band) and validation loss. "
        "Data: variants[].aggregate.",
    )


def _variant_section(page: Page, v: dict) -> None:
    """A variant's verdict, its per-layer figures (mean of seeds) and its runs."""
    agg = v["aggregate"]
    layers = list(range(v["model_config"]["n_layers"]))
    page.add(
        f"<h2>{escape(v['name'])}</h2><p>{verdict_span(v['verdict'])}: "
        f"{escape(variant_verdict_text(v))} {escape(v.get('description', ''))}</p>"
    )
    slug = "".join(c if c.isalnum() else "_" for c in v["name"])
    page.figure(
        f"heatmap_{slug}",
        lambda p: plots.pcorr_heatmap(
            agg["steps"],
            layers,
            agg["layer_pcorr_mean"],
            p,
            f"{v['name']}: pcorr by layer and step (mean of seeds)",
        ),
        f"{v['name']}: validation pcorr per layer × checkpoint, mean over seeds. "
        "Data: aggregate.layer_pcorr_mean.",
    )
    if any(agg.get("cka_to_final_mean") or []):
        page.figure(
            f"cka_{slug}",
            lambda p: plots.cka_over_training(
                agg["steps"],
                layers,
                agg["cka_to_final_mean"],
                p,
                f"{v['name']}: CKA to the final checkpoint",
            ),
            f"{v['name']}: linear CKA of each layer to the same layer at the last "
            "checkpoint (mean of seeds): where the representation settles. Data: "
            "aggregate.cka_to_final_mean.",
        )
    if agg.get("attributes_mean"):
        page.figure(
            f"attributes_{slug}",
            lambda p: plots.attribute_curves(
                agg["steps"],
                layers,
                agg["attributes_mean"],
                p,
                f"{v['name']}: attribute probes",
            ),
            f"{v['name']}: attribute-probe selectivity per layer over training (mean of "
            "seeds). Data: aggregate.attributes_mean.",
        )
    _variant_runs(page, v)


def _variant_runs(page: Page, v: dict) -> None:
    """One row per training seed of a variant."""
    page.table(
        [
            "seed",
            "run",
            "final pcorr [CI, one run]",
            "layer",
            "peak",
            "val loss",
            "verdict",
            "reason",
        ],
        [
            [
                str(r["seed"]),
                f"<code>{escape(r['run_dir'])}</code>",
                f"{number(r['final']['pcorr'])} {interval(r['final']['ci95'])}",
                str(r["final"]["layer"]),
                number(r["peak_pcorr"]),
                number(r["final"]["val_loss"], 3, sign=False),
                verdict_span(r["collapse"]["verdict"]),
                escape(r["collapse"].get("reason") or ""),
            ]
            for r in v["runs"]
        ],
        numeric={3, 4, 5},
    )
