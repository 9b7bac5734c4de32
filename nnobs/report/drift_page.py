"""The HTML page of a drift result: what changed in a site's features when a model was
fine-tuned. Read from the ``nnobs.drift`` document only; nothing is recomputed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nnobs.report.features_page import STYLE, feature_card
from nnobs.report.page import Page, escape, interval, number
from nnobs.report.plots import plt, save_figure


def _histogram_plot(histogram: dict[str, list], threshold: float, xlabel: str):
    def draw(path: Path) -> Path:
        edges, counts = histogram["edges"], histogram["counts"]
        fig, ax = plt.subplots(figsize=(6, 2.8))
        ax.stairs(counts, edges, fill=True, color="#3060c0", alpha=0.7)
        ax.axvline(threshold, color="#a3141a", linestyle="--", label=f"match at {threshold}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("count")
        ax.legend(loc="upper left")
        return save_figure(fig, path)

    return draw


def _neurons(page: Page, neurons: dict[str, Any]) -> None:
    m = neurons["matching"]
    page.add(
        f"<h2>Neurons</h2><p>{neurons['n_units']} neurons matched one to one by activation "
        f"correlation on the same tokens: {m['fraction_matched']:.1%} matched at correlation "
        f"≥ {m['threshold']} (median {number(m['median'])}); {neurons['kept_index']:.1%} "
        f"matched their own index; median correlation with their own index "
        f"{number(neurons['own_correlation']['median'])}.</p>"
    )
    page.figure(
        "neuron_matching",
        _histogram_plot(m["histogram"], m["threshold"], "correlation of matched neurons"),
        "Correlation of each base neuron with its match in the fine-tuned model (Hungarian).",
    )


def _transfer_row(name: str, r: dict[str, Any]) -> list[str]:
    loss = r["loss"]
    return [
        name,
        number(r["variance_explained"], 3, sign=False),
        f"{r['l0']:.1f}",
        f"{loss['spliced']:.4f}",
        f"{number(loss['delta'], 4)} {interval(loss['delta_ci95'], 4)}",
        number(loss["recovered"], 3, sign=False),
    ]


def _baseline(baseline: dict[str, Any] | None) -> str:
    if baseline is None:
        return " No seed-to-seed baseline (the SAEs were given, not trained here)."
    return (
        f" Two SAEs of the base model from different seeds match at "
        f"{baseline['fraction_matched']:.1%} (median {number(baseline['median'])}): the level "
        "a stable dictionary reaches, against which the drift reads."
    )


def _vanish_test(m: dict[str, Any]) -> str:
    test = m.get("vanish_test")
    counts = f"{len(m['vanished'])} vanished, {len(m['appeared'])} appeared"
    if test is None:
        return (
            f" {counts} (best match in the other SAE below cosine {m['threshold']}: a fixed "
            "threshold, not a test; no second base SAE was trained to give a null)."
        )
    return (
        f" {counts} ({test['vanished_rate']:.1%} and {test['appeared_rate']:.1%}): a feature "
        f"vanished when its best match in the fine-tuned SAE is below "
        f"{test['threshold_vanished']:.3f}, the {test['level']:.0%} quantile of best matches "
        f"between two base SAEs of different seeds (appeared: below "
        f"{test['threshold_appeared']:.3f}, likewise). Under that null — same model, another "
        f"SAE seed — {test['expected_rate']:.0%} of the features are called "
        f"({test['expected_vanished']:.1f} and {test['expected_appeared']:.1f} expected)."
    )


def _sae(page: Page, sae: dict[str, Any]) -> None:
    m, transfer = sae["matching"], sae["transfer"]
    page.add(
        f"<h2>SAE features</h2><p>Matched one to one by decoder cosine: "
        f"{m['fraction_matched']:.1%} of the base features at cosine ≥ {m['threshold']} "
        f"(median {number(m['median'])}).{_baseline(sae['seed_baseline'])}"
        f"{_vanish_test(m)}</p>"
    )
    page.figure(
        "sae_matching",
        _histogram_plot(m["histogram"], m["threshold"], "decoder cosine of matched features"),
        "Decoder cosine of each base SAE feature with its match in the fine-tuned model's SAE.",
    )
    clean = transfer["own_sae"]["loss"]["clean"]
    page.add(
        f"<h3>The base SAE in the fine-tuned model</h3><p>Fine-tuned model's loss "
        f"{clean:.4f}; variance explained leaves out the first "
        f"{transfer['own_sae']['skip_positions']} position(s) of each window.</p>"
    )
    page.table(
        ["SAE", "variance explained", "L0", "loss spliced in", "Δ loss (95% CI, documents)",
         "recovered"],
        [_transfer_row("base model's SAE", transfer["base_sae"]),
         _transfer_row("fine-tuned model's own SAE", transfer["own_sae"])],
        numeric={1, 2, 3, 5},
    )  # fmt: skip
    for key, where in (("vanished", "base model"), ("appeared", "fine-tuned model")):
        cards = sae["dashboards"][key]
        page.add(f"<h3>{key.capitalize()} features (on the {where})</h3>")
        page.add("".join(feature_card(f) for f in cards) or "<p>none</p>")


def _change(change: dict[str, Any] | None) -> str:
    if change is None:  # a result written before the change was tested
        return ""
    level = change["level"]
    return (
        f"<p>Change after − before {number(change['difference'])} "
        f"{interval(change['interval'])} ({change['confidence']:.0%} interval over "
        f"{escape(change['interval_over'])}); p = {change['p_value']:.3g} for a change "
        f"(two-sided, level {level:g}): <b>{escape(change['verdict'])}</b>. Kept means not "
        f"changed and the interval within ±{change['margin']:g}; unclear, that the data cannot "
        "tell a change of that size from none.</p>"
    )


def _decision(page: Page, decision: dict[str, Any]) -> None:
    rows = [
        [name, str(r["layer"]), number(r["pcorr"]), interval(r["ci95"])]
        for name, r in (("before", decision["before"]), ("after", decision["after"]))
    ]
    page.add(
        "<h2>The decision-quality signal</h2><p>The protocol on both models, same tokens "
        f"(held out from training: {'yes' if decision['held_out_from_training'] else 'no'}).</p>"
    )
    page.table(["model", "layer", "pcorr (test)", "95% CI"], rows, numeric={2})
    page.add(_change(decision.get("change")))


def render_drift(doc: dict[str, Any], out: str | Path) -> Path:
    """Write ``out/index.html`` for a drift result; returns its path."""
    page = Page(Path(out), f"nnobs drift: {doc['site']}")
    page.add(STYLE)
    before, after = doc["provenance"]["before"], doc["provenance"]["after"]
    page.add(
        f'<p class="meta">before {escape(before.get("path", ""))} · after '
        f"{escape(after.get('path', ''))} · {doc['corpus']['n_windows']} windows of "
        f"{escape(doc['corpus']['spec'])}</p>"
    )
    if doc["neurons"]:
        _neurons(page, doc["neurons"])
    if doc["sae"]:
        _sae(page, doc["sae"])
    page.add("<h2>CKA per layer</h2>")
    page.table(
        ["layer", "site", "linear CKA before vs after"],
        [[str(r["layer"]), escape(r["site"]), f"{r['cka']:.3f}"] for r in doc["cka"]],
        numeric={2},
    )
    if doc["decision"]:
        _decision(page, doc["decision"])
    return page.write()
