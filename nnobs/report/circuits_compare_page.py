"""The dense-vs-sparse circuit size page: the headline ratio with its interval and test, the
two models' validation losses, each task's edges on both models (log axes), and the table.

Drawn from ``compare.json`` (a ``nnobs.circuits_compare`` result) alone; nothing is
recomputed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nnobs.report.page import Page, escape, number
from nnobs.report.plots import plt, save_figure


def _edges(row: dict, model: str) -> float:
    """Edges + 1 (the log axes' and the ratio's offset)."""
    return row[model]["edges"] + 1


def edges_scatter(doc: dict[str, Any], path: str | Path) -> Path:
    """Edges + 1 of each task reached by both models, dense (x) against sparse (y), log axes,
    with the diagonal (equal size) and the line of the geometric-mean ratio."""
    rows = [r for r in doc["tasks"] if r["log_ratio"] is not None]
    fig, ax = plt.subplots(figsize=(6.2, 5.6))
    if rows:
        x = np.array([_edges(r, "dense") for r in rows])
        y = np.array([_edges(r, "sparse") for r in rows])
        ax.scatter(x, y, color="tab:blue", zorder=3)
        for r, xi, yi in zip(rows, x, y, strict=True):
            ax.annotate(r["task"], (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        lo, hi = min(x.min(), y.min()) / 2, max(x.max(), y.max()) * 2
        line = np.array([lo, hi])
        ax.plot(line, line, color="grey", linewidth=0.8, label="equal size")
        ratio = doc["headline"]["ratio"]
        ax.plot(line, line / ratio, color="tab:red", linewidth=0.8,
                label=f"geometric-mean ratio {ratio:.2f}x")  # fmt: skip
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.legend(fontsize=8, loc="upper left")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("dense circuit edges + 1")
    ax.set_ylabel("sparse circuit edges + 1")
    ax.set_title(f"tasks reached by both models: {len(rows)} of {len(doc['tasks'])}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def edges_bars(doc: dict[str, Any], path: str | Path) -> Path:
    """Edges + 1 per task, dense and sparse side by side on a log axis; a task a model did not
    reach has no bar for it (marked ×)."""
    rows = doc["tasks"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(rows) + 2), 4.2))
    index = np.arange(len(rows))
    for offset, model, colour in ((-0.2, "dense", "tab:grey"), (0.2, "sparse", "tab:blue")):
        heights = [_edges(r, model) if r[model]["reached"] else 0 for r in rows]
        ax.bar(index + offset, heights, width=0.4, color=colour, label=model)
        missed = [i for i, r in enumerate(rows) if not r[model]["reached"]]
        ax.scatter(index[missed] + offset, np.ones(len(missed)), marker="x", color=colour)
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.5)  # an empty circuit (1 on this axis) still shows a bar
    ax.set_xticks(index)
    ax.set_xticklabels([r["task"] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("circuit edges + 1")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def _model_lines(doc: dict[str, Any]) -> list[str]:
    lines = []
    for label in ("dense", "sparse"):
        m = doc["models"][label]
        total = m["totals"]["edges"].get("total")
        geo = number(m["geomean_edges"], 1, sign=False)
        lines.append(
            f"{label}: {m['run']} step {m['step']}, validation loss {m['val_loss']:.4f}; "
            f"{total} edges in the whole model; geometric-mean circuit {geo} edges over the "
            f"tasks it reaches; not reached: {', '.join(m['not_reached']) or 'none'}"
        )
    match = doc["matching"]
    lines.append(
        f"matching: {match['how']}; validation-loss gap dense − sparse {match['loss_gap']:+.4f}"
    )
    return lines


def _task_table(page: Page, doc: dict[str, Any]) -> None:
    def size(entry: dict) -> str:
        if not entry["reached"]:
            return f"not reached (full model {entry['full_loss']:.3f})"
        return f"{entry['edges']} edges, {entry['nodes']} nodes (loss {entry['heldout_loss']:.3f})"

    rows = [
        [escape(r["task"]), escape(size(r["dense"])), escape(size(r["sparse"])),
         "—" if r["log_ratio"] is None else f"{np.exp(r['log_ratio']):.2f}x"]
        for r in doc["tasks"]
    ]  # fmt: skip
    page.table(["task", "dense", "sparse", "ratio dense/sparse"], rows, numeric={3})


def render_circuits_compare(doc: dict[str, Any], out: str | Path) -> Path:
    """Write ``out/index.html`` for a ``nnobs.circuits_compare`` result; returns its path."""
    page = Page(Path(out), "nnobs circuits compare: dense vs sparse circuit size")
    head = doc["headline"]
    page.add(f'<p class="answer">{escape(head["statement"])}.</p>')
    settings = doc["settings"]
    page.add(
        f'<p class="meta">target task loss {settings["target_loss"]} nats; '
        f"{settings['n_train']} train and {settings['n_heldout']} held-out items per task; "
        f"test: {escape(head['test'])} at level {head['level']}; 95% interval: percentile "
        f"bootstrap over tasks ({settings['n_boot']} resamples); pruning took "
        f"{doc['pruning_seconds']:.0f} s (both models, all tasks).</p>"
    )
    page.add("<ul>" + "".join(f"<li>{escape(x)}</li>" for x in _model_lines(doc)) + "</ul>")
    page.figure(
        "compare_scatter",
        lambda p: edges_scatter(doc, p),
        "Circuit edges + 1 per task, dense against sparse (log axes); below the diagonal the "
        "sparse circuit is smaller. Data: compare.json.",
    )
    page.figure(
        "compare_bars",
        lambda p: edges_bars(doc, p),
        "Circuit edges + 1 per task on both models (log axis; × marks a task the model does "
        "not do to the target loss). Data: compare.json.",
    )
    _task_table(page, doc)
    return page.write()
