"""Bridges between a dense and a sparse model, and edits carried across them: the hybrid pass
is the model continued from a site, a model bridged to itself (or to an invertible linear
transform of itself) is joined with NMSE near 0, training resumes exactly, and the edit test
finds a planted transfer and holds its level on null data."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_circuit_pruning import FILLERS, A, B, X, Y, planted_model, reference_windows

from nnobs.circuits.bridge_edit import EditSettings, circuit_channel, transfer_edit
from nnobs.circuits.bridge_eval import evaluate_bridges
from nnobs.circuits.bridge_loss import hybrid_logits
from nnobs.circuits.bridge_model import Bridges, abs_top_k, bridge_sites, check_pair
from nnobs.circuits.bridge_train import BridgeSettings, train_bridges
from nnobs.circuits.edit_transfer import edit_test, parse_channel, sign_flip_test
from nnobs.circuits.prune import CircuitPruner
from nnobs.core.errors import NnobsError
from nnobs.data.tasks import EncodedTask
from nnobs.data.windows import make_windows
from nnobs.models.adapter import nnobs_adapter
from nnobs.models.config import ModelConfig
from nnobs.models.transformer import Transformer

VOCAB = 48


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: one thread is faster than two on a shared machine."""


def tiny_model(seed: int = 0, **knobs):
    torch.manual_seed(seed)
    shape = {"vocab_size": VOCAB, "d_model": 16, "n_layers": 2, "n_heads": 2, "max_seq_len": 32,
             "norm": "rmsnorm", "tie_embeddings": False}  # fmt: skip
    cfg = ModelConfig(**{**shape, **knobs})
    return nnobs_adapter(Transformer(cfg).eval(), provenance={"path": f"tiny-{seed}"})


def token_stream(n: int = 6000, seed: int = 0) -> np.ndarray:
    """Tokens with some structure (a noisy counter), so the models' streams are not white."""
    rng = np.random.default_rng(seed)
    return ((np.arange(n) // 3 + rng.integers(0, 4, n)) % VOCAB).astype(np.int64)


def heldout_windows():
    docs = [token_stream(120, seed=100 + d) for d in range(12)]
    return make_windows(docs, 16, seed=1)


def test_abs_top_k_keeps_the_largest_magnitudes_and_passes_their_gradient():
    x = torch.tensor([[0.5, -3.0, 1.0, 2.0], [-0.1, 0.2, -0.3, 0.0]], requires_grad=True)
    y = abs_top_k(x, 2)
    assert torch.equal(y.detach(), torch.tensor([[0, -3.0, 0, 2.0], [0, 0.2, -0.3, 0]]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([[0, 1.0, 0, 1], [0, 1, 1, 0]]))
    assert abs_top_k(x, 4) is x


def test_a_hybrid_pass_is_the_model_continued_from_each_site():
    adapter = tiny_model()
    ids = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(0))
    sites = bridge_sites(2)
    _, cache = adapter.run_with_cache(ids, sites)
    same = hybrid_logits(adapter, ids, {s: cache[s] for s in sites})
    plain, _ = adapter.run_with_cache(ids, [])
    assert torch.allclose(same, plain.expand_as(same), atol=1e-5)
    other = {s: cache[s] + torch.randn_like(cache[s]) for s in sites}
    mixed = hybrid_logits(adapter, ids, other)
    for i, site in enumerate(sites):
        alone, _ = adapter.run_with_cache(ids, [], edits={site: lambda x, v=other[site]: v})
        assert torch.allclose(mixed[i], alone, atol=1e-5)
        assert not torch.allclose(mixed[i], plain, atol=1e-3)


SETTINGS = BridgeSettings(k=16, init="random", steps=150, batch_size=8, seq_len=16, lr=3e-2,
                          checkpoint_every=50)  # fmt: skip


@pytest.mark.parametrize("transform", ["itself", "rotated"])
def test_a_model_bridged_to_itself_or_a_linear_transform_of_itself_has_nmse_near_zero(
    transform, tmp_path
):
    dense = tiny_model()
    sparse = tiny_model()
    if transform == "rotated":  # the same function with its stream in another basis
        rotate = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(5)))[0]
        rotated_model(sparse.model, rotate)
    bridges = train_bridges(dense, sparse, tmp_path / "b", SETTINGS, progress=False,
                            stream=token_stream())  # fmt: skip
    result = evaluate_bridges(bridges, dense, sparse, heldout_windows(), n_boot=200)
    for site in result["sites"]:
        assert site["nmse_encode"]["value"] < 0.03, site
        assert site["nmse_decode"]["value"] < 0.03, site
        for hybrid in ("sparse_hybrid", "dense_hybrid"):
            assert site[hybrid]["kl_dense"]["value"] < 0.01, site
    assert result["n_documents"] == 12
    losses = result["models"]
    if transform == "rotated":
        assert losses["dense"]["loss"]["value"] == pytest.approx(losses["sparse"]["loss"]["value"],
                                                                 abs=1e-4)  # fmt: skip


def test_the_least_squares_start_already_joins_a_model_and_its_rotation(tmp_path):
    dense, sparse = tiny_model(), tiny_model()
    rotated_model(sparse.model, torch.linalg.qr(torch.randn(16, 16))[0])
    settings = BridgeSettings(k=16, steps=1, batch_size=2, seq_len=16, lr=1e-9)
    bridges = train_bridges(dense, sparse, tmp_path / "b", settings, progress=False,
                            stream=token_stream())  # fmt: skip
    result = evaluate_bridges(bridges, dense, sparse, heldout_windows(), n_boot=50)
    for site in result["sites"]:
        assert site["nmse_encode"]["value"] < 1e-4 and site["nmse_decode"]["value"] < 1e-4


def rotated_model(model: Transformer, q: torch.Tensor) -> None:
    """Write ``model``'s stream in the basis ``q`` (orthogonal): the function is unchanged (its
    RMSNorm gains are all one, and an RMS is rotation-invariant) and every residual activation
    becomes ``x @ q``."""
    assert all(torch.all(p == 1) for n, p in model.named_parameters() if "norm" in n)
    with torch.no_grad():
        model.tok_emb.weight.copy_(model.tok_emb.weight @ q)
        if model.pos_emb is not None:
            model.pos_emb.weight.copy_(model.pos_emb.weight @ q)
        for block in model.blocks:
            for proj in (*block.attn.projections(), block.mlp.up):
                proj.weight.copy_(proj.weight @ q)
            for proj in (block.attn.o_proj, block.mlp.down):
                proj.weight.copy_(q.T @ proj.weight)
                if proj.bias is not None:
                    proj.bias.copy_(proj.bias @ q)
        model.unembed.weight.copy_(model.unembed.weight @ q)


def same_weights(a: Bridges, b: Bridges) -> bool:
    mine, theirs = a.state_dict(), b.state_dict()
    return mine.keys() == theirs.keys() and all(torch.equal(v, theirs[k]) for k, v in mine.items())


def test_resuming_equals_training_uninterrupted(tmp_path):
    dense, sparse = tiny_model(0), tiny_model(1)
    settings = BridgeSettings(k=4, steps=12, batch_size=4, seq_len=12, lr=1e-2,
                              checkpoint_every=4, log_every=2)  # fmt: skip
    whole = train_bridges(dense, sparse, tmp_path / "whole", settings, progress=False,
                          stream=token_stream())  # fmt: skip
    part = train_bridges(dense, sparse, tmp_path / "part", settings, progress=False,
                         stream=token_stream(), stop_after=4)  # fmt: skip
    assert not (tmp_path / "part" / "bridges.safetensors").exists()
    # A run killed after logging step 6 but before its next checkpoint (step 8) left lines that
    # resuming from step 4 must drop.
    with open(tmp_path / "part" / "metrics.jsonl", "a") as log:
        log.write('{"step": 6, "loss": 99.0}\n')
    assert not same_weights(part, whole)
    resumed = train_bridges(dense, sparse, tmp_path / "part", settings, progress=False,
                            stream=token_stream())  # fmt: skip
    assert same_weights(resumed, whole)
    log = (tmp_path / "whole" / "metrics.jsonl").read_text()
    assert (tmp_path / "part" / "metrics.jsonl").read_text() == log
    # Finished: left alone, loaded as it is.
    before = (tmp_path / "part" / "bridges.safetensors").stat().st_mtime_ns
    again = train_bridges(dense, sparse, tmp_path / "part", settings, progress=False,
                          stream=token_stream())  # fmt: skip
    assert (tmp_path / "part" / "bridges.safetensors").stat().st_mtime_ns == before
    assert same_weights(again, whole)
    with pytest.raises(NnobsError, match="made from other models"):
        train_bridges(tiny_model(2), sparse, tmp_path / "part", settings, progress=False)
    with pytest.raises(NnobsError, match=r"other settings \(lr\)"):
        train_bridges(dense, sparse, tmp_path / "part", BridgeSettings(**{
            **settings.__dict__, "lr": 0.5}), progress=False)  # fmt: skip


def test_models_of_other_vocabularies_or_depths_are_refused_naming_both():
    base = tiny_model()
    deeper = tiny_model(n_layers=3)
    with pytest.raises(NnobsError, match=r"tiny-0 and sparse model tiny-0.*depth 2 vs 3"):
        check_pair(base, deeper, "tiny-0", "tiny-0")
    torch.manual_seed(0)
    other = nnobs_adapter(Transformer(ModelConfig(vocab_size=50, d_model=16, n_layers=2,
                                                  n_heads=2, max_seq_len=32)))  # fmt: skip
    with pytest.raises(NnobsError, match="vocabulary 48 vs 50 tokens"):
        check_pair(base, other, "d", "s")


# ------------------------------------------------------------------------ edit transfer


def planted_pairs(n: int, seed: int) -> EncodedTask:
    """Presented prompts ending in A (answer X) or B (answer Y); the counterfactual prompt is
    the same with the other final token (and answer)."""
    rng = np.random.default_rng(seed)
    clean, corrupted, correct, incorrect = [], [], [], []
    for i in range(n):
        prefix = [int(t) for t in rng.choice(FILLERS, size=1 + i % 2)]
        last, other = (A, B) if i % 2 == 0 else (B, A)
        clean.append(prefix + [last])
        corrupted.append(prefix + [other])
        correct.append(X if last == A else Y)
        incorrect.append(Y if last == A else X)
    return EncodedTask("planted", {}, clean, corrupted, correct, incorrect, list(range(n)), n, "-")


def identity_bridges(d: int) -> Bridges:
    bridges = Bridges(bridge_sites(1), d, d, d)
    with torch.no_grad():
        for module in (*bridges.encoders.values(), *bridges.decoders.values()):
            module.weight.copy_(torch.eye(d))
            module.bias.zero_()
    return bridges


def test_the_planted_channel_transfers_and_a_channel_the_model_ignores_does_not():
    model = planted_model()  # channel 0 of the MLP's input decides the answer (X or Y)
    task = planted_pairs(24, 0)
    settings = EditSettings(n_controls=3, n_perm=2000, n_boot=200)
    args = (identity_bridges(4), model, model, task)
    found = transfer_edit(*args, "blocks.0.mlp_in", 0, reference_windows(), settings)
    curve = {row["alpha"]: row for row in found["curve"]}
    assert curve[0.0]["edit"]["value"] < 0.01 and curve[1.0]["edit"]["value"] > 0.99
    assert curve[0.5]["edit"]["value"] == pytest.approx(0.5, abs=0.01)  # channel 0 at 0
    assert all(row["control"]["value"] < 0.01 for row in found["curve"])
    assert found["controls"] == [1, 2, 3] and found["channel"]["mean_abs_delta"] > 0.5
    assert found["test"]["verdict"] == "transfers" and found["test"]["p_value"] < 0.001
    assert found["test"]["effect"]["ci95"][0] > 0.9
    ignored = transfer_edit(*args, "blocks.0.mlp_in", 2, reference_windows(), settings)
    assert ignored["channel"]["mean_abs_delta"] == 0.0  # channel 2 is the same on both prompts
    assert ignored["test"]["verdict"] == "no_transfer"


def test_prompts_of_unequal_length_are_left_out_or_lined_up_at_their_last_token():
    model = planted_model()
    task = planted_pairs(24, 0)
    longer = [[FILLERS[1], *prompt] for prompt in task.corrupted]  # one token more, in front
    task = dataclasses.replace(task, corrupted=longer)
    settings = EditSettings(n_controls=3, n_perm=2000, n_boot=200)
    args = (identity_bridges(4), model, model, task, "blocks.0.mlp_in", 0, reference_windows())
    with pytest.raises(NnobsError, match="--align right"):
        transfer_edit(*args, settings)
    aligned = transfer_edit(*args, dataclasses.replace(settings, align_right=True))
    assert aligned["items"] == {"n_used": 24, "n_left_out": 0}
    assert (
        aligned["test"]["verdict"] == "transfers" and aligned["curve"][-1]["edit"]["value"] > 0.99
    )


def test_the_default_channel_is_the_circuit_read_with_the_largest_delta():
    model = planted_model()
    task = planted_pairs(32, 0)
    pruner = CircuitPruner(lr=1e-2, steps=150, batch=32, ablation="zero", seed=0)
    site, channel, info = circuit_channel(model, task, planted_pairs(16, 1), reference_windows(),
                                          pruner)  # fmt: skip
    assert (site, channel) == ("blocks.0.mlp_in", 0)  # the one read node of the planted circuit
    assert info["n_nodes"] == 4 and info["heldout_loss"] <= 0.15
    assert [(c["site"], c["channel"]) for c in info["candidates"]] == [("blocks.0.mlp_in", 0)]
    assert info["candidates"][0]["mean_abs_delta"] == pytest.approx(2 / 2.5)  # ±2 at the last
    # of 2.5 tokens on average


def test_the_sign_flip_test_holds_its_level_on_null_data_and_finds_a_planted_effect():
    rng = np.random.default_rng(0)
    n_sims, level = 2000, 0.05
    null = [sign_flip_test(rng.normal(0, 0.1, 30), n_perm=500, seed=s) for s in range(n_sims)]
    rate = np.mean(np.array(null) < level)
    # At most the level, up to sampling error (a one-sided 99.5% binomial bound).
    assert rate <= level + 2.58 * np.sqrt(level * (1 - level) / n_sims)
    assert rate > 0.01  # and it is a test at all
    hits = [
        edit_test(rng.normal(0.6, 0.2, 30), rng.uniform(0.3, 0.5, (4, 30)), n_perm=500,
                  n_boot=200, seed=s)["verdict"] == "transfers"
        for s in range(50)
    ]  # fmt: skip
    assert np.mean(hits) >= 0.95


def test_channels_are_read_sites_in_range():
    assert parse_channel("blocks.1.attn_in:7", 2, 16) == ("blocks.1.attn_in", 7)
    with pytest.raises(NnobsError, match="index 16 is out of range 0..15"):
        parse_channel("blocks.1.mlp_in:16", 2, 16)
    with pytest.raises(NnobsError, match="layer 2 is out of range"):
        parse_channel("blocks.2.mlp_in:0", 2, 16)
    with pytest.raises(NnobsError, match="not SITE:INDEX"):
        parse_channel("blocks.1.resid_pre:3", 2, 16)
    with pytest.raises(NnobsError, match="include 1"):
        EditSettings(alphas=(0.0, 0.5))
