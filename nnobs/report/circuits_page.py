"""The circuits page: the verdict, the circuit drawn as a graph, its nodes and edges per kind,
the bisection curve and the checks with their intervals. Drawn from ``circuits.json`` alone
(:mod:`nnobs.circuits.graph` builds and lays out the graph from it); nothing is recomputed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.collections import LineCollection

from nnobs.circuits.graph import circuit_graph, drawn_part, layered_positions
from nnobs.core.files import atomic_path
from nnobs.report.page import Page, escape, interval, number
from nnobs.report.plots import plt, save_figure

KIND_COLOURS = {
    "resid_read": "#4c72b0", "resid_write": "#55a868", "mlp_neuron": "#c44e52",
    "q": "#8172b2", "k": "#937860", "v": "#da8bc3",
}  # fmt: skip
SIGN_COLOURS = {1: "#1f5fbf", -1: "#c0392b"}
LABELLED_NODES = 80  # more nodes than this are drawn without their labels


def circuit_figure(doc: dict[str, Any]):
    """The circuit graph as a matplotlib figure, layered left to right (see
    :func:`nnobs.circuits.graph.layered_positions`); edge colour is the weight's sign, edge
    width its magnitude relative to the largest edge of its kind."""
    graph, note = drawn_part(circuit_graph(doc))
    pos = layered_positions(graph)
    xs = [p[0] for p in pos.values()] or [0.0]
    ys = [p[1] for p in pos.values()] or [0.0]
    width = min(24.0, 3.0 + 0.9 * (max(xs) - min(xs) + 1))
    height = min(24.0, 2.5 + 0.28 * (max(ys) - min(ys) + 1))
    fig, ax = plt.subplots(figsize=(width, height))
    edges = list(graph.edges(data=True))
    if edges:
        peak: dict[str, float] = {}  # per edge kind: a norm gain and a weight differ in scale
        for *_, d in edges:
            peak[d["kind"]] = max(peak.get(d["kind"], 0.0), abs(d["weight"]))
        segments = [(pos[u], pos[v]) for u, v, _ in edges]
        colours = [SIGN_COLOURS[d["sign"]] for *_, d in edges]
        widths = [0.4 + 2.6 * abs(d["weight"]) / peak[d["kind"]] for *_, d in edges]
        ax.add_collection(LineCollection(segments, colors=colours, linewidths=widths, alpha=0.6))
    for kind, colour in KIND_COLOURS.items():
        members = [n for n, d in graph.nodes(data=True) if d["kind"] == kind]
        if members:
            ax.scatter(*zip(*(pos[n] for n in members), strict=True), s=60, c=colour,
                       edgecolors="black", linewidths=0.5, zorder=3, label=kind)  # fmt: skip
    if graph.number_of_nodes() <= LABELLED_NODES:
        for n, d in graph.nodes(data=True):
            ax.annotate(d["label"], pos[n], fontsize=6, xytext=(0, 5), textcoords="offset points",
                        ha="center", zorder=4)  # fmt: skip
    layers = sorted({d["layer"] for _, d in graph.nodes(data=True)})
    ax.set_xticks([8 * layer + 3.5 for layer in layers], [f"layer {layer}" for layer in layers])
    ax.set_yticks([])
    ax.margins(0.08)
    circuit = doc["circuit"]
    title = f"{doc['task']['name']}: {circuit['n_nodes']} nodes, {circuit['n_edges']} edges"
    if note:
        title += f"\n({note})"
    elif not circuit["edges_listed_all"]:
        title += "\n(the result lists only the largest-|weight| edges)"
    ax.set_title(title, fontsize=9)
    ax.plot([], [], color=SIGN_COLOURS[1], label="positive weight")
    ax.plot([], [], color=SIGN_COLOURS[-1], label="negative weight")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def draw_circuit(doc: dict[str, Any], png: str | Path, svg: str | Path | None = None) -> Path:
    """Draw the circuit to ``png`` (and ``svg``), atomically; returns the PNG's path."""
    fig = circuit_figure(doc)
    if svg is not None:
        with atomic_path(svg) as tmp:
            fig.savefig(tmp, format="svg", bbox_inches="tight")
    return save_figure(fig, png)


def bisection_figure(doc: dict[str, Any], path: str | Path) -> Path:
    """Held-out loss against kept nodes (τ order) at every size the bisection tried, the
    nonsense control's curve on its training items, the target and the full model."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    curve = doc["bisection"]
    ax.plot([max(p["nodes"], 0.8) for p in curve], [p["loss"] for p in curve], "o-", ms=4,
            label="task, held-out bisection items")  # fmt: skip
    control = doc["checks"]["nonsense_control"]
    if control is not None:
        points = control["train_curve"]
        ax.plot([max(p["nodes"], 0.8) for p in points], [p["loss"] for p in points], "s--",
                ms=3, color="grey", label="shuffled labels, their training items")  # fmt: skip
    target = doc["settings"]["target_loss"]
    ax.axhline(target, color="black", ls=":", lw=1, label=f"target {target}")
    ax.axhline(np.log(2), color="grey", ls="-", lw=0.6, label="chance (log 2)")
    ax.axvline(max(doc["circuit"]["n_nodes"], 0.8), color="tab:red", lw=0.8, label="circuit")
    ax.set_xscale("log")
    ax.set_xlabel("kept nodes (highest τ first)")
    ax.set_ylabel("task loss (nats)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def necessity_figure(doc: dict[str, Any], path: str | Path) -> Path:
    """The loss with the circuit ablated against the losses with random same-size sets."""
    nec = doc["checks"]["necessity"]
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.hist(nec["random_losses"], bins=20, color="lightgrey", edgecolor="grey",
            label=f"{nec['n_random']} random sets of the same size and kinds")  # fmt: skip
    ax.axvline(nec["ablated_loss"], color="tab:red", label="circuit ablated")
    ax.axvline(nec["full_loss"], color="black", ls=":", label="full model")
    ax.set_xlabel("task loss with the set ablated (nats, check items)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _kinds_table(page: Page, circuit: dict[str, Any]) -> None:
    rows = [
        [escape(kind), str(n), str(circuit["model_nodes_by_kind"].get(kind, 0))]
        for kind, n in circuit["nodes_by_kind"].items()
    ]
    page.table(["node kind", "in the circuit", "in the model"], rows, numeric={1, 2})
    rows = [[escape(kind), str(n)] for kind, n in circuit["edges_by_kind"].items()]
    page.table(["edge kind", "edges"], rows + [["total", str(circuit["n_edges"])]], numeric={1})


def _checks_table(page: Page, doc: dict[str, Any]) -> None:
    suff, nec = doc["checks"]["sufficiency"], doc["checks"]["necessity"]
    rows = [[
        "sufficiency: only the circuit live",
        f"{number(suff['loss'], 3, sign=False)} {interval(suff['loss_ci95'])}",
        f"full model {number(suff['full_loss'], 3, sign=False)} "
        f"{interval(suff['full_loss_ci95'])}; target {suff['target']}",
        "sufficient" if suff["sufficient"] else "not sufficient",
    ]]  # fmt: skip
    if nec["testable"]:
        rows.append([
            "necessity: only the circuit ablated",
            f"{number(nec['ablated_loss'], 3, sign=False)} {interval(nec['ablated_loss_ci95'])}",
            f"increase over the full model {number(nec['effect'])} {interval(nec['effect_ci95'])};"
            f" over random sets {number(nec['excess_over_random'])} "
            f"{interval(nec['excess_over_random_ci95'])}; p = {nec['p_value']:.3f} "
            f"(level {nec['level']}, {nec['n_random']} sets)",
            "necessary" if nec["necessary"] else "not necessary",
        ])  # fmt: skip
    else:
        rows.append(["necessity", "—", escape(nec["reason"]), "untestable"])
    control = doc["checks"]["nonsense_control"]
    if control is not None:
        rows.append([
            "nonsense control: labels shuffled",
            f"{number(control['best_train_loss'], 3, sign=False)} (training items)",
            f"best of the τ-ranked prefixes, {control['best_nodes']} nodes; held-out "
            f"{number(control['heldout_loss'], 3, sign=False)}",
            "fits noise" if control["reaches_target"] else "does not reach the target",
        ])  # fmt: skip
    page.table(["check", "loss (nats, 95% interval)", "against", "outcome"], rows, numeric={1})


def render_circuits_section(page: Page, doc: dict[str, Any]) -> None:
    """The circuits section of a report page."""
    task, settings, circuit = doc["task"], doc["settings"], doc["circuit"]
    model = doc["model"]
    page.add(f"<h2>Circuit of {escape(task['name'])}</h2>")
    page.add(f'<p class="answer">{escape(doc["verdict"]["statement"])}</p>')
    page.add(
        f'<p class="meta">{escape(task["description"])}. Model {escape(model.get("path", "?"))} '
        f"(step {escape(model.get('step', '?'))}); {settings['ablation']} ablation, target "
        f"{settings['target_loss']} nats, k_coef {settings['k_coef']}, {settings['steps']} "
        f"steps; {task['n_train']} training, {task['n_bisect']} bisection and "
        f"{task['n_check']} check items (intervals: bootstrap over check items).</p>"
    )
    page.figure(
        "circuit",
        lambda p: draw_circuit(doc, p),
        "The circuit: nodes by layer and kind (r read, w write, n neuron, q/k/v channel), "
        "edges coloured by the sign of their weight. Data: circuits.json.",
    )
    _kinds_table(page, circuit)
    page.add("<h3>Checks</h3>")
    _checks_table(page, doc)
    page.figure(
        "bisection",
        lambda p: bisection_figure(doc, p),
        "Task loss against the number of kept nodes (highest τ first) at every size the "
        "bisection tried, and the nonsense control's curve. Data: circuits.json.",
    )
    if doc["checks"]["necessity"]["testable"]:
        page.figure(
            "necessity",
            lambda p: necessity_figure(doc, p),
            "Task loss with the circuit ablated against random node sets of its size and "
            "kinds drawn outside it. Data: circuits.json.",
        )


def render_circuits(doc: dict[str, Any], out: str | Path) -> Path:
    """Write ``out/index.html`` for a circuits result; returns its path."""
    page = Page(Path(out), f"nnobs circuits: {doc['task']['name']}")
    render_circuits_section(page, doc)
    return page.write()
