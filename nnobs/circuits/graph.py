"""A circuit as a graph: built from a circuits result alone, laid out layer by layer.

Nodes carry layer, kind, sublayer, channel index and τ; edges carry kind, weight and sign.
The layout runs left to right in forward order, eight columns per layer (attention read,
q, k, v, attention write, MLP read, neuron, MLP write), a column's nodes stacked by channel.
A circuit too large to read is summarised: its largest-|weight| edges and the nodes they
join are drawn, and :func:`drawn_part` says how much was left out.
"""

from __future__ import annotations

from typing import Any

import networkx as nx

COLUMNS = {
    ("attn", "resid_read"): 0, ("attn", "q"): 1, ("attn", "k"): 2, ("attn", "v"): 3,
    ("attn", "resid_write"): 4, ("mlp", "resid_read"): 5, ("mlp", "mlp_neuron"): 6,
    ("mlp", "resid_write"): 7,
}  # fmt: skip
SHORT = {"resid_read": "r", "resid_write": "w", "mlp_neuron": "n", "q": "q", "k": "k", "v": "v"}
MAX_EDGES, MAX_NODES = 400, 300


def node_label(node: dict[str, Any]) -> str:
    """``L1 mlp w7``: layer, sublayer, kind (r/w/n/q/k/v) and channel."""
    return f"L{node['layer']} {node['sublayer']} {SHORT[node['kind']]}{node['index']}"


def circuit_graph(doc: dict[str, Any]) -> nx.DiGraph:
    """The circuit of a ``nnobs.circuits`` document as a directed graph (node ids are
    positions in the document's node list). A SwiGLU read feeds a neuron through two
    weights; the edge keeps the larger one and counts both (``multiplicity``)."""
    graph = nx.DiGraph()
    for i, node in enumerate(doc["circuit"]["nodes"]):
        graph.add_node(i, **node, label=node_label(node))
    for edge in doc["circuit"]["edges"]:
        u, v = edge["source"], edge["target"]
        if graph.has_edge(u, v):
            graph.edges[u, v]["multiplicity"] += 1
            continue
        sign = 1 if edge["weight"] > 0 else -1
        graph.add_edge(u, v, kind=edge["kind"], weight=edge["weight"], sign=sign, multiplicity=1)
    return graph


def drawn_part(
    graph: nx.DiGraph, max_edges: int = MAX_EDGES, max_nodes: int = MAX_NODES
) -> tuple[nx.DiGraph, str | None]:
    """The part of ``graph`` to draw, and a note when it is not all of it: every node and
    edge when they fit; else the ``max_edges`` largest-|weight| edges and the nodes they
    join (at most ``max_nodes``)."""
    if graph.number_of_edges() <= max_edges and graph.number_of_nodes() <= max_nodes:
        return graph, None
    ranked = sorted(graph.edges(data=True), key=lambda e: -abs(e[2]["weight"]))
    nodes: set[int] = set()
    kept = []
    for u, v, _ in ranked:
        if len(kept) == max_edges or len(nodes | {u, v}) > max_nodes:
            break
        nodes |= {u, v}
        kept.append((u, v))
    part = graph.edge_subgraph(kept).copy()
    note = (
        f"showing the {part.number_of_edges()} largest-|weight| of "
        f"{graph.number_of_edges()} listed edges and the {part.number_of_nodes()} of "
        f"{graph.number_of_nodes()} nodes they join"
    )
    return part, note


def layered_positions(graph: nx.DiGraph) -> dict[int, tuple[float, float]]:
    """(x, y) of every node: x the node's column in forward order, y its rank within the
    column, centred on 0."""
    columns: dict[int, list[int]] = {}
    for n, data in graph.nodes(data=True):
        x = 8 * data["layer"] + COLUMNS[(data["sublayer"], data["kind"])]
        columns.setdefault(x, []).append(n)
    positions = {}
    for x, members in columns.items():
        members.sort(key=lambda n: graph.nodes[n]["index"])
        for rank, n in enumerate(members):
            positions[n] = (float(x), rank - (len(members) - 1) / 2)
    return positions
