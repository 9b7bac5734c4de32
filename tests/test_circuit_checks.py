"""Checks of a pruned circuit (sufficiency, necessity against random node sets, the
nonsense-task control), its verdict, its edge list and its graph: on the planted circuit,
where the truth is known, and on a model where a node set is irrelevant (the null)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from test_circuit_pruning import PLANTED, planted_model, planted_task, reference_windows

from nnobs.circuits import checks
from nnobs.circuits.edges import circuit_edge_list, circuit_edges
from nnobs.circuits.graph import circuit_graph, drawn_part, layered_positions
from nnobs.circuits.masks import node_means
from nnobs.circuits.nodes import circuit_adapter, node_locations
from nnobs.circuits.prune import CircuitPruner
from nnobs.circuits.result import verdict
from nnobs.core.errors import NnobsError
from nnobs.data.tasks import EncodedTask
from nnobs.models.adapter import nnobs_adapter
from nnobs.models.config import ModelConfig
from nnobs.models.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def planted_setup(tmp_path):
    adapter = circuit_adapter(planted_model())
    locations = node_locations(adapter)
    means = node_means(adapter, locations, reference_windows(), cache_dir=tmp_path)
    return adapter, locations, means


def test_the_planted_circuit_is_sufficient_and_necessary_and_shuffled_labels_miss(tmp_path):
    adapter, locations, means = planted_setup(tmp_path)
    items = planted_task(48, 5)
    suff = checks.sufficiency(adapter, locations, PLANTED, items, means, target=0.15)
    assert suff["sufficient"] and suff["loss"] < 0.01 and suff["full_loss"] < 0.01
    assert suff["loss_ci95"][0] <= suff["loss"] <= suff["loss_ci95"][1]
    nec = checks.necessity(adapter, locations, PLANTED, items, means, n_random=39, level=0.05)
    assert nec["testable"] and nec["necessary"] and nec["p_value"] == pytest.approx(1 / 40)
    assert nec["composition"] == {"resid_read": 1, "mlp_neuron": 2, "resid_write": 1}
    assert nec["ablated_loss"] > 0.5 and nec["effect_ci95"][0] > 0.4  # the task is gone
    assert max(nec["random_losses"]) < 0.01  # no other node matters here
    # Three of the four planted nodes: ablating them is still necessary, keeping them is not
    # sufficient.
    partial = sorted(PLANTED)[:3]
    assert not checks.sufficiency(adapter, locations, partial, items, means, 0.15)["sufficient"]
    pruner = CircuitPruner(lr=1e-2, steps=150, batch=32, seed=0)
    control = checks.nonsense_control(
        adapter, pruner, planted_task(48, 0), items, reference_windows(), means, tmp_path
    )
    # The output depends on the last token alone, so no circuit fits labels drawn at random.
    assert not control["reaches_target"] and control["best_train_loss"] > 0.4
    assert control["train_curve"][-1]["nodes"] == 32
    found = verdict({"n_nodes": 4, "n_edges": 4}, {"sufficiency": suff, "necessity": nec,
                                                   "nonsense_control": control})  # fmt: skip
    assert found["circuit_found"] and found["fits_noise"] is False
    assert found["statement"].startswith("Circuit found: 4 nodes, 4 edges")
    assert "did not fit noise" in found["statement"]


def irrelevant_setup():
    """A random 2-layer model and a random two-answer task: no node set is special."""
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=16, d_model=16, n_layers=2, n_heads=2, d_mlp=32, max_seq_len=8)
    adapter = circuit_adapter(nnobs_adapter(Transformer(cfg).eval()))
    rng = np.random.default_rng(0)
    clean = [[int(t) for t in rng.integers(0, 16, 4)] for _ in range(24)]
    correct = [int(a) for a in rng.integers(0, 8, 24)]
    wrong = [int(a) + 8 for a in rng.integers(0, 8, 24)]
    task = EncodedTask("random", {}, clean, clean, correct, wrong, list(range(24)), 24, "none")
    return adapter, task


def test_necessity_fires_at_about_its_level_when_the_circuit_is_an_arbitrary_node_set():
    adapter, task = irrelevant_setup()
    locations = node_locations(adapter)
    every = [(loc.site, i, loc.kind) for loc in locations for i in range(loc.width)]
    rng = np.random.default_rng(7)
    p_values = []
    for draw in range(40):
        picks = rng.choice(len(every), 6, replace=False)
        circuit = [every[i][:2] for i in picks]
        result = checks.necessity(adapter, locations, circuit, task, None, 19, 0.1, seed=draw)
        p_values.append(result["p_value"])
    fired = np.mean(np.array(p_values) <= 0.1)
    # Nominal rate 0.1; 40 draws: 9 or more firings has probability < 0.05 under the null.
    assert fired <= 0.2, p_values
    assert 0.3 < np.mean(p_values) < 0.7  # p-values spread over (0, 1], not stuck at one end


def test_random_sets_match_the_circuit_in_size_and_kinds_and_avoid_it():
    locations = node_locations(planted_model())
    circuit = sorted(PLANTED)
    sets = checks.random_node_sets(locations, circuit, 25, seed=0)
    kind = {loc.site: loc.kind for loc in locations}
    for nodes in sets:
        assert len(set(nodes)) == 4 and not set(nodes) & PLANTED
        assert Counter(kind[s] for s, _ in nodes) == Counter(kind[s] for s, _ in circuit)
    assert len({tuple(sorted(s)) for s in sets}) > 5
    # Every MLP neuron but one is in the circuit: no disjoint set of three neurons exists.
    crowded = [("blocks.0.mlp_hidden", i) for i in range(3)]
    assert checks.random_node_sets(locations, crowded, 5, seed=0) is None


def test_a_level_the_random_sets_cannot_reach_is_refused():
    with pytest.raises(NnobsError, match="use at least 19"):
        checks.check_level(0.05, 9)
    with pytest.raises(NnobsError, match=r"in \(0, 1\)"):
        checks.check_level(1.5, 99)


def test_shuffled_labels_swap_about_half_the_items_and_keep_the_prompts():
    task = planted_task(200, 0)
    noisy = checks.shuffled_labels(task, seed=3)
    swapped = np.array(noisy.correct) != np.array(task.correct)
    assert 70 < swapped.sum() < 130 and noisy.clean == task.clean
    assert all(noisy.incorrect[i] == task.correct[i] for i in np.flatnonzero(swapped))


def sparse_swiglu_model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, d_mlp=12,
                      activation="swiglu", norm="rmsnorm", max_seq_len=8)  # fmt: skip
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_((torch.rand_like(p) < 0.5).float())
    return nnobs_adapter(model)


def test_the_edge_list_holds_exactly_the_counted_edges_with_their_weights():
    adapter = sparse_swiglu_model()
    rng = np.random.default_rng(0)
    kept = {(loc.site, i) for loc in node_locations(adapter) for i in range(loc.width)
            if rng.random() < 0.6}  # fmt: skip
    listed = circuit_edge_list(adapter, kept)
    counts = circuit_edges(adapter, kept)
    assert Counter(e[0] for e in listed) == Counter({k: v for k, v in counts.items()
                                                     if k != "total" and v})  # fmt: skip
    assert len(listed) == counts["total"] > 50
    assert all(src in kept and dst in kept and w != 0 for _, src, dst, w in listed)
    model = circuit_adapter(adapter).model
    for kind, (src, i), (_, j), w in listed:
        if kind == "neuron->write":
            assert w == float(model.blocks[int(src.split(".")[1])].mlp.down.weight[j, i].detach())


def test_the_planted_graph_is_laid_out_in_forward_order_and_large_ones_are_summarised():
    adapter = planted_model()
    nodes = [{"site": s, "kind": k, "layer": 0, "sublayer": "mlp", "index": i, "tau": 0.5}
             for s, k, i in [("blocks.0.mlp_in", "resid_read", 0),
                             ("blocks.0.mlp_hidden", "mlp_neuron", 0),
                             ("blocks.0.mlp_hidden", "mlp_neuron", 1),
                             ("blocks.0.mlp_out", "resid_write", 1)]]  # fmt: skip
    at = {(n["site"], n["index"]): i for i, n in enumerate(nodes)}
    edges = [{"source": at[s], "target": at[d], "kind": k, "weight": w}
             for k, s, d, w in circuit_edge_list(adapter, PLANTED)]  # fmt: skip
    doc = {"circuit": {"nodes": nodes, "edges": edges}}
    graph = circuit_graph(doc)
    assert sorted((graph.nodes[u]["label"], graph.nodes[v]["label"], d["sign"])
                  for u, v, d in graph.edges(data=True)) == [
        ("L0 mlp n0", "L0 mlp w1", 1), ("L0 mlp n1", "L0 mlp w1", -1),
        ("L0 mlp r0", "L0 mlp n0", 1), ("L0 mlp r0", "L0 mlp n1", -1),
    ]  # fmt: skip
    x = {graph.nodes[n]["label"]: p[0] for n, p in layered_positions(graph).items()}
    assert x["L0 mlp r0"] < x["L0 mlp n0"] == x["L0 mlp n1"] < x["L0 mlp w1"]
    assert drawn_part(graph) == (graph, None)
    part, note = drawn_part(graph, max_edges=2)
    assert part.number_of_edges() == 2 and "2 largest-|weight| of 4 listed edges" in note
