"""The frontier section: pretraining loss against circuit size, and the paper's two claims.

Drawn from a ``nnobs.frontier`` result alone (``frontier.json``); nothing is recomputed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nnobs.report.page import Page, escape, number
from nnobs.report.plots import plt, save_figure

CLAIM_TITLES = {"sparser": "(a) sparser at a fixed width", "wider": "(b) wider at a fixed L0"}


def _interval_text(bounds: list | None, digits: int) -> str:
    return "—" if not bounds else f"[{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]"


def _errors(value: float, bounds: list | None) -> np.ndarray:
    if not bounds:
        return np.zeros((2, 1))
    return np.abs(np.array(bounds, dtype=float) - value).reshape(2, 1)


def _loss_against_l0(ax, points: list[dict[str, Any]]) -> None:
    """Each width's loss against L0 (log scale), with intervals: what is left to show when no
    task is reached by every model."""
    for width in sorted({p["width"] for p in points}):
        here = sorted((p for p in points if p["width"] == width), key=lambda p: p["l0"])
        l0 = [p["l0"] for p in here]
        loss = [p["loss"] for p in here]
        errors = np.hstack([_errors(p["loss"], p["loss_ci"]) for p in here])
        ax.errorbar(l0, loss, yerr=errors, marker="o", capsize=2, label=f"width {width}")
    ax.set_xscale("log")
    ax.set_xlabel("L0 (nonzero parameters)")
    ax.set_ylabel("pretraining loss on held-out documents (nats/token)")
    ax.set_title("no task reached by every model, so no circuit size: loss against L0", fontsize=9)
    ax.legend(fontsize=8)


def frontier_plot(doc: dict[str, Any], path: str | Path) -> Path:
    """Loss (y) against geometric-mean circuit edges (x, log scale), colour the total
    parameters, marker area the L0; 95% intervals both ways; Pareto points joined."""
    from matplotlib.colors import LogNorm

    points = [p for p in doc["points"] if p["geomean_edges"] is not None]
    fig, ax = plt.subplots(figsize=(7.0, 5.0))
    if not points:  # no circuit size to place the models by: loss against L0 instead
        _loss_against_l0(ax, doc["points"])
        fig.tight_layout()
        return save_figure(fig, path)
    params = np.array([p["n_params"] for p in points], dtype=float)
    l0 = np.array([p["l0"] for p in points], dtype=float)
    norm = LogNorm(params.min(), max(params.max(), params.min() * 1.01))
    cmap = plt.get_cmap("viridis")
    sizes = 40 + 360 * np.sqrt(l0 / l0.max())
    x = np.array([p["geomean_edges"] + 1 for p in points])
    for p, xi, size in zip(points, x, sizes, strict=True):
        colour = cmap(norm(p["n_params"]))
        ci = None if p["geomean_edges_ci"] is None else [v + 1 for v in p["geomean_edges_ci"]]
        ax.errorbar(xi, p["loss"], xerr=_errors(xi, ci), yerr=_errors(p["loss"], p["loss_ci"]),
                    color=colour, capsize=2, linestyle="none", zorder=1)  # fmt: skip
        ax.scatter([xi], [p["loss"]], s=size, color=colour, edgecolor="black", zorder=2)
    pareto = sorted((xi, p["loss"]) for p, xi in zip(points, x, strict=True) if p["pareto"])
    ax.plot(*zip(*pareto, strict=True), color="grey", linestyle="--", linewidth=0.8, zorder=0)
    ax.set_xscale("log")
    # a decade beyond the points: with few tasks the intervals span many decades, and an axis
    # drawn to their ends would squeeze every point into one spot
    low, high = x.min() / 10, x.max() * 10
    clipped = any(
        ci is not None and (ci[0] + 1 < low or ci[1] + 1 > high)
        for ci in (p["geomean_edges_ci"] for p in points)
    )
    ax.set_xlim(low, high)
    _label_points(ax, x, [p["loss"] for p in points], [p["name"] for p in points])
    ax.set_xlabel(
        f"circuit size: geometric mean of edges + 1 over {len(doc['tasks']['common'])} tasks"
        + (" (bars cut at the axis)" if clipped else "")
    )
    ax.set_ylabel("pretraining loss on held-out documents (nats/token)")
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax)
    bar.set_label("total parameters")
    for value in sorted({float(v) for v in (l0.min(), l0.max())}):
        ax.scatter([], [], s=40 + 360 * np.sqrt(value / l0.max()), color="white",
                   edgecolor="black", label=f"L0 {value:,.0f}")  # fmt: skip
    ax.legend(fontsize=7, loc="best", labelspacing=1.5, borderpad=1.0)
    ax.set_title(f"target task loss {doc['config']['target_loss']} nats; dashed: Pareto frontier",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    return save_figure(fig, path)


def _label_points(ax, xs, ys, names: list[str], fontsize: int = 7) -> None:
    """Name each point beside it, at the first of four corners where the label overlaps no
    label placed before (greedily, the lowest-loss point first)."""
    ax.autoscale_view()
    to_points = 72 / ax.figure.dpi
    placed: list[tuple[float, float, float, float]] = []
    for i in np.argsort(ys):
        px, py = ax.transData.transform((xs[i], ys[i])) * to_points
        width, height = 0.6 * fontsize * len(names[i]), fontsize
        corners = [(6, 4), (6, -4 - height), (-6 - width, 4), (-6 - width, -4 - height)]
        for dx, dy in corners:
            box = (px + dx, py + dy, px + dx + width, py + dy + height)
            if not any(_overlap(box, other) for other in placed):
                break
        placed.append(box)
        ax.annotate(names[i], (xs[i], ys[i]), fontsize=fontsize, xytext=(dx, dy),
                    textcoords="offset points")  # fmt: skip


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _points_table(page: Page, doc: dict[str, Any]) -> None:
    rows = []
    for p in doc["points"]:
        run_losses = ", ".join(
            f"{r['val_loss']:.3f}" for r in p["runs"] if r["val_loss"] is not None
        )
        rows.append([
            escape(p["name"]), str(p["width"]), f"{p['keep']:.4f}", f"{p['n_params']:,}",
            f"{p['l0']:,.0f}",
            f"{number(p['geomean_edges'], 1, sign=False)} "
            f"{_interval_text(p['geomean_edges_ci'], 1)}",
            f"{p['loss']:.3f} {_interval_text(p['loss_ci'], 3)}", escape(run_losses or "—"),
            "yes" if p["pareto"] else "", escape(", ".join(p["not_reached"]) or "—"),
        ])  # fmt: skip
    page.table(
        ["model", "width", "kept fraction", "parameters", "L0", "circuit edges (geomean)",
         "loss (held-out docs)", "trainer val loss", "Pareto", "tasks not reached"],
        rows, numeric={1, 2, 3, 4, 5, 6, 7},
    )  # fmt: skip


def _tasks_table(page: Page, doc: dict[str, Any]) -> None:
    """Per task and model (first seed): the full model's held-out task loss, and the circuit's
    edges where the target was reached."""
    target = doc["config"]["target_loss"]
    rows = []
    for task in doc["tasks"]["all"]:
        cells = []
        for p in doc["points"]:
            r = p["runs"][0]["tasks"][task]
            edges = f" → {r['edges']:,} edges" if r["reached"] else ""
            cells.append(f"{r['full_loss']:.3f}{edges}")
        common = " (common)" if task in doc["tasks"]["common"] else ""
        rows.append([escape(task + common), *cells])
    page.add(
        f"<p>Full-model held-out task loss per task (a circuit exists where it is at most the "
        f"target, {target} nats; its edges follow the arrow):</p>"
    )
    page.table(
        ["task", *(escape(p["name"]) for p in doc["points"])],
        rows,
        numeric=set(range(1, len(doc["points"]) + 1)),
    )


def _claims(page: Page, doc: dict[str, Any]) -> None:
    level = doc["statistics"]["level"]
    for name, claim in doc["claims"].items():
        verdict = escape(claim["verdict"])
        page.add(
            f"<h3>{escape(CLAIM_TITLES.get(name, name))}: "
            f'<span class="verdict-{verdict}">{verdict}</span></h3>'
            f"<p>{escape(claim['statement'])}. Circuit size: {escape(claim['edges_verdict'])}; "
            f"loss: {escape(claim['loss_verdict'])} (level {level}).</p>"
        )
        if not claim["comparisons"]:
            page.add("<p class='meta'>The grid has no pair of models this claim compares.</p>")
            continue
        page.table(
            ["from", "to", "tasks", "edges ratio", "p (claimed)", "Δ loss", "p (claimed)"],
            [[escape(c["from"]), escape(c["to"]), escape(", ".join(c["tasks"]) or "none"),
              f"{number(c['edges_ratio'], 2, sign=False)} {_interval_text(c['edges_ratio_ci'], 2)}",
              f"{c['edges_p_claimed']:.3g}",
              f"{number(c['loss_difference'], 3)} {_interval_text(c['loss_difference_ci'], 3)}",
              f"{c['loss_p_claimed']:.3g}"] for c in claim["comparisons"]],
            numeric={3, 4, 5, 6},
        )  # fmt: skip


def seed_note(doc: dict[str, Any]) -> str:
    """How many training seeds the intervals cover, and what one seed leaves out."""
    seeds = len(doc["config"]["seeds"])
    if seeds == 1:
        return "one training seed: the intervals leave out initialisation variance"
    return f"{seeds} training seeds"


def render_frontier_section(page: Page, doc: dict[str, Any]) -> None:
    """The frontier section of a report page."""
    cfg, stats, timing = doc["config"], doc["statistics"], doc["timing"]
    common = doc["tasks"]["common"]
    page.add("<h2>Capability–interpretability frontier</h2>")
    page.add(
        f'<p class="meta">{escape(cfg.get("description", ""))} Circuits pruned to a held-out '
        f"task loss of {cfg['target_loss']} nats for {len(doc['tasks']['all'])} tasks; "
        f"{len(common)} reached by every model ({escape(', '.join(common) or 'none')}) are "
        "averaged per model; each comparison of two models uses the tasks both reach. Loss on "
        f"{stats['n_documents']} held-out documents. Intervals at {1 - stats['level']:.0%}: "
        f"bootstrap ({stats['n_boot']} resamples) over tasks, documents and training seeds "
        f"({seed_note(doc)}). Training {timing['train_seconds']:.0f} s, scoring "
        f"{timing['eval_seconds']:.0f} s, pruning {timing['sizing_seconds']:.0f} s of compute.</p>"
    )
    page.figure(
        "frontier",
        lambda p: frontier_plot(doc, p),
        "Pretraining loss against circuit size (log scale) for every model of the grid: colour "
        "total parameters, marker area L0 (nonzero weights); bars are the intervals. Down and "
        "to the left is better on both counts (with no task common to every model: loss against "
        "L0 instead). Data: frontier.json.",
    )
    _points_table(page, doc)
    _tasks_table(page, doc)
    page.add("<h3>The paper's claims</h3>")
    page.add(
        "<p>Supported: every comparison significant in the claimed direction; contradicted: "
        "some comparison significant in the opposite direction (Bonferroni over comparisons); "
        "otherwise inconclusive.</p>"
    )
    _claims(page, doc)


def render_frontier(doc: dict[str, Any], out: str | Path) -> Path:
    """Write ``out/index.html`` for a frontier result; returns its path."""
    page = Page(Path(out), "nnobs frontier")
    render_frontier_section(page, doc)
    return page.write()
