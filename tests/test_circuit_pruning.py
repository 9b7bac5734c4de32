"""Learned circuit pruning: node locations, gates, mean ablation, bisection, edges, and a
planted circuit recovered from a hand-built model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnobs.circuits.edges import circuit_edges
from nnobs.circuits.masks import NodeMasks, gate_edits, node_means, step_gate
from nnobs.circuits.nodes import circuit_adapter, node_counts, node_locations
from nnobs.circuits.prune import CircuitPruner, keep_gates, smallest_passing
from nnobs.core.errors import NnobsError
from nnobs.data.tasks import EncodedTask
from nnobs.models.adapter import ModelAdapter, nnobs_adapter
from nnobs.models.config import ModelConfig
from nnobs.models.transformer import Transformer

A, B, X, Y = 1, 2, 3, 4  # prompt tokens A/B; answers X (after A) and Y (after B)
FILLERS = (0, 5, 6, 7)
PLANTED = {
    ("blocks.0.mlp_in", 0),
    ("blocks.0.mlp_hidden", 0),
    ("blocks.0.mlp_hidden", 1),
    ("blocks.0.mlp_out", 1),
}


def zeroed(cfg: ModelConfig) -> Transformer:
    """A model of ``cfg`` with every weight zero and every norm gain one."""
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0 if "norm" in name else 0.0)
    return model


def planted_model():
    """Channel 0 of the stream holds +1 after A, -1 after B; neurons 0 (relu(+c0)) and 1
    (relu(-c0)) write ±3 to channel 1, which alone the unembedding reads (X: +1, Y: -1).
    Attention is zero. The task can only be done through the four PLANTED nodes."""
    cfg = ModelConfig(vocab_size=8, d_model=4, n_layers=1, n_heads=1, d_mlp=4, max_seq_len=8,
                      activation="relu", norm="none", tie_embeddings=False)  # fmt: skip
    model = zeroed(cfg)
    mlp = model.blocks[0].mlp
    with torch.no_grad():
        model.tok_emb.weight[A, 0], model.tok_emb.weight[B, 0] = 1.0, -1.0
        mlp.up.weight[0, 0], mlp.up.weight[1, 0] = 1.0, -1.0
        mlp.down.weight[1, 0], mlp.down.weight[1, 1] = 3.0, -3.0
        model.unembed.weight[X, 1], model.unembed.weight[Y, 1] = 1.0, -1.0
    return nnobs_adapter(model)


def planted_task(n: int, seed: int) -> EncodedTask:
    """Prompts of 2 or 3 tokens ending in A (answer X) or B (answer Y)."""
    rng = np.random.default_rng(seed)
    clean, correct, incorrect = [], [], []
    for i in range(n):
        last = A if i % 2 == 0 else B
        clean.append([int(t) for t in rng.choice(FILLERS, size=1 + i % 3 // 2)] + [last])
        correct.append(X if last == A else Y)
        incorrect.append(Y if last == A else X)
    return EncodedTask("planted", {}, clean, clean, correct, incorrect, list(range(n)), n, "none")


def reference_windows() -> torch.Tensor:
    return torch.randint(0, 8, (16, 6), generator=torch.Generator().manual_seed(3))


def small_adapter(**knobs):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, d_model=8, n_layers=2, n_heads=2, max_seq_len=8, **knobs)
    return nnobs_adapter(Transformer(cfg).eval())


def test_node_locations_are_sites_with_their_widths_and_counted_per_kind():
    adapter = small_adapter(n_kv_heads=1, d_mlp=16, activation="swiglu")
    locations = node_locations(adapter)
    assert node_counts(locations) == {
        "resid_read": 32, "resid_write": 32, "mlp_neuron": 32, "q": 16, "k": 8, "v": 8,
    }  # fmt: skip
    extended = circuit_adapter(adapter)
    ids = torch.zeros(2, 3, dtype=torch.long)
    _, cache = extended.run_with_cache(ids, [loc.site for loc in locations])
    assert {s: t.shape[-1] for s, t in cache.items()} == {l.site: l.width for l in locations}
    assert set(adapter.sites) < set(extended.sites)  # the original adapter is untouched


def test_gate_is_the_step_forward_and_the_sigmoid_derivative_backward():
    tau = torch.tensor([-0.5, -0.01, 0.02, 0.7], requires_grad=True)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    for temperature in (1.0, 0.25):
        tau.grad = None
        gated = x * step_gate(tau, temperature)
        assert torch.equal(gated, x * (tau.detach() > 0).float())
        gated.sum().backward()
        s = torch.sigmoid(tau.detach() / temperature)
        assert torch.allclose(tau.grad, x.sum(0) * s * (1 - s) / temperature)
    with pytest.raises(NnobsError, match="temperature"):
        step_gate(tau, 0.0)


def test_gate_edit_through_the_adapter_zeroes_exactly_the_closed_channels():
    adapter = circuit_adapter(small_adapter())
    gate = torch.tensor([1.0, 0, 1, 1, 0, 0, 1, 1])
    ids = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(1))
    _, plain = adapter.run_with_cache(ids, ["blocks.1.mlp_in"])
    edits = gate_edits({"blocks.1.mlp_in": gate}, None)
    _, gated = adapter.run_with_cache(ids, ["blocks.1.mlp_in"], edits=edits)
    assert torch.equal(gated["blocks.1.mlp_in"], plain["blocks.1.mlp_in"] * gate)


def test_mean_ablation_of_every_node_equals_replacing_activations_by_their_means(tmp_path):
    adapter = circuit_adapter(small_adapter())
    locations = node_locations(adapter)
    reference = reference_windows()
    means = node_means(adapter, locations, reference, cache_dir=tmp_path)
    ids = torch.randint(0, 16, (3, 4), generator=torch.Generator().manual_seed(2))
    closed = keep_gates(locations, [], torch.device("cpu"))
    ablated, _ = adapter.run_with_cache(ids, [], edits=gate_edits(closed, means))
    # The means by hand over the unedited reference run, each site replaced by its mean.
    _, cache = adapter.run_with_cache(reference, [loc.site for loc in locations])
    replaced = {}
    for loc in locations:
        mean = cache[loc.site].mean((0, 1))
        assert torch.allclose(means[loc.site], mean, atol=1e-6)
        replaced[loc.site] = lambda x, m=mean: m.expand_as(x)
    by_hand, _ = adapter.run_with_cache(ids, [], edits=replaced)
    assert torch.allclose(ablated, by_hand, atol=1e-6)
    unablated, _ = adapter.run_with_cache(ids, [])
    assert not torch.allclose(ablated, unablated, atol=1e-3)


def test_bisection_returns_the_smallest_passing_size_of_a_monotone_curve():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 40))
        losses = np.sort(rng.uniform(0, 1, n + 1))[::-1]
        losses[-1] = min(losses[-1], 0.1)
        calls = []

        def loss_at(m, calls=calls, losses=losses):
            calls.append(m)
            return float(losses[m])

        k, curve = smallest_passing(n, loss_at, 0.15)
        assert k == int(np.flatnonzero(losses <= 0.15)[0])
        assert curve == {m: float(losses[m]) for m in calls}
        assert len(calls) <= int(np.ceil(np.log2(n + 2))) + 1
    with pytest.raises(NnobsError, match="full model"):
        smallest_passing(5, lambda m: 0.5, 0.15)


def test_tau_is_clamped_to_plus_minus_one_after_every_step():
    adapter = planted_model()
    pruner = CircuitPruner(lr=0.5, steps=12, batch=16, ablation="zero", target_loss=0.5)
    pruner.fit(adapter, planted_task(32, 0), planted_task(16, 1))
    tau = torch.cat(list(pruner.tau_.values()))
    assert tau.min() >= -1.0 and tau.max() <= 1.0
    assert (tau == -1.0).any()  # a step of 0.5 from 0.1 leaves [-1, 1] unless clamped


def test_masks_start_near_one_tenth():
    masks = NodeMasks(node_locations(planted_model()), seed=1)
    tau = torch.cat(list(masks.tau().values()))
    assert abs(float(tau.mean()) - 0.1) < 0.01 and 0.005 < float(tau.std()) < 0.02


@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_pruning_finds_the_planted_circuit(ablation, tmp_path):
    adapter = planted_model()
    pruner = CircuitPruner(lr=1e-2, steps=150, batch=32, ablation=ablation, seed=0)
    pruner.fit(adapter, planted_task(48, 0), planted_task(24, 1), reference_windows(), tmp_path)
    assert pruner.kept_ == PLANTED
    assert pruner.active_[0] == 32 and pruner.active_[-1] == len(PLANTED)
    assert pruner.heldout_loss_ <= 0.15
    assert pruner.curve_[len(PLANTED) - 1] > 0.15  # one node fewer misses the target
    assert all(p.requires_grad for p in adapter.model.parameters())  # unfrozen again
    edges = circuit_edges(adapter, pruner.kept_)
    assert edges["read->neuron"] == 2 and edges["neuron->write"] == 2 and edges["total"] == 4


def test_mean_ablation_needs_reference_windows():
    with pytest.raises(NnobsError, match="reference windows"):
        CircuitPruner(steps=1).fit(planted_model(), planted_task(8, 0), planted_task(8, 1))
    with pytest.raises(NnobsError, match="unknown ablation"):
        CircuitPruner(ablation="resample").fit(planted_model(), planted_task(8, 0), None)


def test_edges_of_a_hand_made_sparse_pattern():
    cfg = ModelConfig(vocab_size=8, d_model=4, n_layers=2, n_heads=2, n_kv_heads=1, d_mlp=3,
                      max_seq_len=8, norm="rmsnorm", tie_embeddings=False)  # fmt: skip
    model = zeroed(cfg)
    b0 = model.blocks[0]
    with torch.no_grad():
        b0.attn.q_proj.weight[0, 0] = 1.0  # read 0 is not kept
        b0.attn.v_proj.weight[0, 1] = b0.attn.v_proj.weight[1, 2] = 1.0  # v 1 is not kept
        # v channel 0 feeds o_proj columns 0 (head 0) and 2 (head 1); column 1 is v channel 1.
        b0.attn.o_proj.weight[3, 0] = b0.attn.o_proj.weight[3, 2] = 1.0
        b0.attn.o_proj.weight[2, 1] = 1.0
        b0.mlp.up.weight[0, 3] = b0.mlp.up.weight[1, 3] = b0.mlp.up.weight[2, 0] = 1.0
        b0.mlp.down.weight[0, 0] = b0.mlp.down.weight[0, 2] = b0.mlp.down.weight[1, 0] = 1.0
        model.blocks[1].norm1.weight[2] = 0.0  # attn read 2 of layer 1 sees nothing
    kept = {("blocks.0.attn_in", c) for c in (1, 2, 3)} | {("blocks.0.q", 0), ("blocks.0.v", 0)}
    kept |= {("blocks.0.attn_out", 2), ("blocks.0.attn_out", 3), ("blocks.0.mlp_in", 3)}
    kept |= {("blocks.0.mlp_hidden", 0), ("blocks.0.mlp_hidden", 2), ("blocks.0.mlp_out", 0)}
    kept |= {("blocks.1.attn_in", 2), ("blocks.1.attn_in", 3)}
    assert circuit_edges(nnobs_adapter(model), kept) == {
        "read->q": 0, "read->k": 0, "read->v": 1, "v->write": 2, "read->neuron": 1,
        "neuron->write": 2, "write->read": 2, "total": 8,
    }  # fmt: skip
    with pytest.raises(NnobsError, match="not a node"):
        circuit_edges(nnobs_adapter(model), {("blocks.0.mlp_out", 9)})


def test_models_without_the_node_sites_are_refused_in_one_line():
    foreign = ModelAdapter(model=torch.nn.Linear(2, 2), sites={}, n_layers=1, d_model=2,
                           vocab_size=2)  # fmt: skip
    with pytest.raises(NnobsError, match="needs an nnobs Transformer"):
        node_locations(foreign)
    with pytest.raises(NnobsError, match="additive residual"):
        circuit_edges(small_adapter(residual="none"), set())
