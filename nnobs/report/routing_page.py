"""The routing section: mass against causal importance, for each analysed model side by side.

Drawn from a ``nnobs.routing`` result alone (``routing.json``); nothing is recomputed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nnobs.report.page import Page, escape, interval, number
from nnobs.report.plots import plt, save_figure

MARKERS = {"embedding": "o", "current": "s", "history": "^"}
COLOURS = {"attn": "tab:blue", "mlp": "tab:orange"}


def mass_effect_plot(doc: dict[str, Any], path: str | Path) -> Path:
    """Mass (x) against the masking effect on loss (y), one panel per model, with intervals."""
    models = doc["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for cell in model["cells"]:
            if cell["mask_loss"] is None:
                continue
            x, y = cell["mass"], cell["mask_loss"]
            xerr = np.abs(np.array(cell["mass_ci95"]) - x).reshape(2, 1)
            yerr = np.abs(np.array(cell["mask_loss_ci95"]) - y).reshape(2, 1)
            ax.errorbar(
                x, y, xerr=xerr, yerr=yerr, marker=MARKERS[cell["family"]],
                color=COLOURS[cell["sublayer"]], alpha=0.85, capsize=2, linestyle="none",
            )  # fmt: skip
            ax.annotate(cell["band"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        rank = model["rank_correlation"]
        ax.axhline(0, color="grey", linewidth=0.6)
        ax.set_title(
            f"{model['label']} ({model['routing']['kind']}, {model['routing']['blocks']} blocks)\n"
            f"Spearman {rank['spearman']:+.2f} {interval(rank['ci95'], 2)}",
            fontsize=9,
        )
        ax.set_xlabel("routing mass (mean weight of the family)")
        ax.set_ylabel("Δ loss when the family is masked (nats)")
    for family, marker in MARKERS.items():
        axes[0][0].plot([], [], marker=marker, color="black", linestyle="none", label=family)
    for sub, colour in COLOURS.items():
        axes[0][0].plot([], [], marker="o", color=colour, linestyle="none", label=sub)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)


def _model_section(page: Page, model: dict[str, Any]) -> None:
    routing = model["routing"]
    page.add(f"<h3>{escape(model['label'])}</h3>")
    facts = [
        f"{routing['kind']}, {routing['blocks']} blocks",
        f"{model['n_documents']} documents",
        f"largest routing-weight spread over tokens {model['max_weight_std']:.2e}",
    ]
    if "wrap_check" in model:
        check = model["wrap_check"]
        facts.append(
            f"wrap: recency {routing['recency']}, max logit difference from the vanilla model "
            f"{check['max_logit_diff']:.1e}, max deviation from the schedule "
            f"{check['max_schedule_error']:.1e}"
        )
    page.add(f'<p class="meta">{escape(" · ".join(facts))}</p>')
    page.table(
        ["family", "sublayer", "band", "mass", "mask Δloss", "mask KL", "fix-to-mean Δloss"],
        [[c["family"], c["sublayer"], c["band"],
          f"{number(c['mass'], 3, sign=False)} {interval(c['mass_ci95'])}",
          f"{number(c['mask_loss'], 4)} {interval(c['mask_loss_ci95'], 4)}",
          f"{number(c['mask_kl'], 4, sign=False)} {interval(c['mask_kl_ci95'], 4)}",
          f"{number(c['fix_loss'], 4)} {interval(c['fix_loss_ci95'], 4)}"]
         for c in model["cells"]],
        numeric={3, 4, 5, 6},
    )  # fmt: skip
    rank = model["rank_correlation"]
    lines = [
        f"Rank correlation of mass with masking effect over {rank['n_cells']} cells: "
        f"{rank['spearman']:+.2f} {interval(rank['ci95'], 2)}: {rank['verdict']}."
    ]
    for d in model["dissociation"]:
        lines.append(
            f"{d['sublayer']}: largest mass {d['largest_mass']}, largest effect "
            f"{d['largest_effect']} (effect gap {interval(d['effect_gap_ci95'], 4)}): "
            f"{d['verdict']}."
        )
    for m in model["mass_without_effect"]:
        lines.append(
            f"Mass without a detectable effect: {m['cell']} (mass {m['mass']:.2f}, effect "
            f"{interval(m['effect_ci95'], 4)})."
        )
    for d in model["motifs"]["depends_on"]:
        clear = "clearly" if d["clear"] else "not separably"
        lines.append(f"{d['band']} {d['sublayer']} depends {clear} on {d['family']}.")
    for p in model["motifs"]["published"]:
        lines.append(f"Published motif {p['motif']}: {p['status']}.")
    page.add("<ul>" + "".join(f"<li>{escape(line)}</li>" for line in lines) + "</ul>")


def render_routing_section(page: Page, doc: dict[str, Any]) -> None:
    """The routing section of a report page."""
    settings = doc["settings"]
    page.add("<h2>Routing mass against causal importance</h2>")
    page.add(
        f'<p class="meta">{escape(settings["corpus"])} ({escape(settings["split"])}), '
        f"{settings['windows']} windows of {settings['window_len']} tokens, "
        f"{settings['bands']} depth bands, {settings['n_boot']} bootstrap resamples over "
        "documents (95% intervals).</p>"
    )
    page.figure(
        "routing_mass_effect",
        lambda p: mass_effect_plot(doc, p),
        "Routing mass of each source family against the change in loss when it is masked "
        "out of the softmax, per sublayer and depth band, models side by side. Data: "
        "routing.json.",
    )
    for model in doc["models"]:
        _model_section(page, model)


def render_routing(doc: dict[str, Any], out: str | Path) -> Path:
    """Write ``out/index.html`` for a routing result; returns its path."""
    page = Page(Path(out), "nnobs routing")
    render_routing_section(page, doc)
    return page.write()
