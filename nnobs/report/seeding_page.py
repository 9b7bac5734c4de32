"""The seeding page: the experiment's question answered from its pre-declared verdicts, the
gap over training with its seed-bootstrap bands, the probe scores of every condition, and
the sensitivity of the asymptote to the decay model. Drawn from ``seeding.json`` alone."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from nnobs.report.page import Page, escape, interval, number, verdict_span
from nnobs.report.plots import save_figure

LABELS = {
    "seeded_aux_vs_random": "seeded (with aux) − random",
    "seeded_noaux_vs_random": "seeded (no aux) − random",
    "aux_vs_noaux_seeded": "seeded with aux − seeded without",
}


def gap_figure(doc: dict, path: Path) -> Path:
    """Per layer: each comparison's mean gap over training with its bootstrap band."""
    steps = np.maximum(np.array(doc["steps"], float), 0.5)  # step 0 shown on a log axis
    n_layers = len(doc["comparisons"]["seeded_aux_vs_random"]["layers"])
    fig, axes = plt.subplots(1, n_layers, figsize=(4.2 * n_layers, 3.6), squeeze=False)
    for layer, ax in enumerate(axes[0]):
        for name, comparison in doc["comparisons"].items():
            result = comparison["layers"][layer]
            (line,) = ax.plot(steps, result["gap"], "o-", ms=3, label=LABELS.get(name, name))
            ax.fill_between(steps, *result["gap_ci"], color=line.get_color(), alpha=0.18)
            ax.axhline(result["asymptote"], color=line.get_color(), ls=":", lw=1)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("training step of the large model")
    axes[0][0].set_ylabel(f"probe {doc['metric']} gap")
    axes[0][-1].legend(fontsize=7)
    return save_figure(fig, path)


def score_figure(doc: dict, path: Path) -> Path:
    """Per layer: each large condition's mean probe score over training."""
    steps = np.maximum(np.array(doc["steps"], float), 0.5)
    large = {c: v for c, v in doc["conditions"].items() if c.startswith("large")}
    n_layers = len(next(iter(large.values()))["scores"][0][0])
    fig, axes = plt.subplots(1, n_layers, figsize=(4.2 * n_layers, 3.4), squeeze=False)
    for layer, ax in enumerate(axes[0]):
        for condition, values in large.items():
            scores = np.array(values["scores"], float)[:, :, layer]
            ax.plot(steps, scores.mean(0), "o-", ms=3, label=condition.replace("_", " "))
        ax.set_xscale("log")
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("training step")
    axes[0][0].set_ylabel(f"probe {doc['metric']} (mean over seeds)")
    axes[0][-1].legend(fontsize=7)
    return save_figure(fig, path)


def _answer(doc: dict) -> str:
    primary = doc["comparisons"][doc["plan"]["primary"]]["layers"]
    control = doc["comparisons"]["seeded_noaux_vs_random"]["layers"]
    verdicts = ", ".join(f"layer {i}: {r['verdict']}" for i, r in enumerate(primary))
    persist = [i for i, r in enumerate(primary) if r["verdict"] == "persists"]
    own = [i for i in persist if control[i]["verdict"] != "persists"]
    tail = (
        f" At layers {own} the control (seeded without the auxiliary task) does not persist, "
        "so what persists is the auxiliary task's doing."
        if own
        else " The control (seeding without the auxiliary task) persists as well wherever "
        "the seeded gap does, so seeding alone explains it."
        if persist
        else ""
    )
    return (
        f"{escape(doc['question'])} Verdicts for {escape(doc['attribute'])} "
        f"(probe {escape(doc['metric'])}, {len(primary)} layers): {escape(verdicts)}.{tail}"
    )


def _final_table(page: Page, doc: dict) -> None:
    """Each condition at its last checkpoint: main-task loss and probe score per layer, the
    mean over seeds."""
    rows = []
    for condition, values in doc["conditions"].items():
        losses = [run[-1] for run in values["val_loss"] if run[-1] is not None]
        scores = np.array([run[-1] for run in values["scores"]], float).mean(0)
        rows.append([
            escape(condition.replace("_", " ")), str(values["steps"][-1]),
            number(float(np.mean(losses)) if losses else None, sign=False),
            ", ".join(number(float(v)) for v in scores),
        ])  # fmt: skip
    page.add("<h2>At the end of training</h2>")
    page.table(
        ["condition", "step", "validation loss (nats)", f"probe {doc['metric']} by layer"],
        rows,
        numeric={1, 2},
    )


def render_seeding(doc: dict, out_dir: str | Path) -> Path:
    """Write the seeding page (``index.html`` and its figures) into ``out_dir``."""
    out = Path(out_dir)
    page = Page(out, "Seeded initialisation: does the planted representation persist?")
    plan = doc["plan"]
    page.add(f'<p class="answer">{_answer(doc)}</p>')
    page.add(
        f"<p>Declared before the data: decay model <b>{escape(plan['decay_model'])}</b> "
        f"(asymptote decides); {escape(plan['verdict'])}; intervals: {escape(plan['interval'])}"
        f" at {plan['confidence']:.0%}, per layer. Sensitivity only: "
        f"{escape(', '.join(plan['sensitivity_models']))}.</p>"
    )
    page.figure(
        "gap",
        lambda p: gap_figure(doc, p),
        "Gap in probe score over training (mean over seeds; band: seed-bootstrap interval; "
        "dotted: fitted asymptote of the declared model).",
    )
    rows = []
    for name, comparison in doc["comparisons"].items():
        for layer, r in enumerate(comparison["layers"]):
            sens = r["sensitivity"]
            rows.append([
                escape(LABELS.get(name, name)), str(layer), verdict_span(r["verdict"]),
                f"{number(r['early_gap'])} {interval(r['early_ci'])}",
                f"{number(r['asymptote'])} {interval(r['asymptote_ci'])}",
                f"{number(sens['power']['asymptote'])} {interval(sens['power']['ci'])}",
                f"{number(sens['late_mean']['asymptote'])} {interval(sens['late_mean']['ci'])}",
            ])  # fmt: skip
    page.table(
        ["comparison", "layer", "verdict", "early gap", "asymptote (declared)",
         "power law (sensitivity)", "late mean (sensitivity)"],
        rows,
    )  # fmt: skip
    page.figure(
        "scores",
        lambda p: score_figure(doc, p),
        "Probe score of each large condition over training, mean over seeds.",
    )
    _final_table(page, doc)
    grown = doc.get("grown", [])
    if grown:
        worst = max(g["max_logit_difference"] for g in grown)
        page.add(
            f"<p>{len(grown)} grown runs; largest logit difference from their small model at "
            f"growth: {worst:.2e}. Experiment wall time {doc['wall_s']:.0f} s.</p>"
        )
    return page.write()
