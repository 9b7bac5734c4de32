"""Growing a model: exact for every knob combination grow accepts, refused otherwise, and a
grown run that trains on from step 0 with provenance naming its parent."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from nnobs.core.errors import NnobsError
from nnobs.models.config import ModelConfig
from nnobs.models.transformer import Transformer
from nnobs.seeding.grow import GrowthPlan, grow_model, max_logit_difference

SMALL = dict(vocab_size=61, d_model=16, n_layers=2, n_heads=2, max_seq_len=24)
# (small knobs, large knobs, layer map): every kind of growth, on every architecture knob
# that changes what a copied weight computes.
CASES = {
    "more-layers-first": ({}, dict(n_layers=4), None),
    "more-layers-spread": ({}, dict(n_layers=5), [1, 3]),
    "more-heads": ({}, dict(n_heads=4, d_head=8), None),
    "wider-mlp": ({}, dict(d_mlp=100), None),
    "per-layer-mlp": (dict(d_mlp=[8, 40]), dict(n_layers=3, d_mlp=[9, 50, 40]), [0, 1]),
    "longer-context": ({}, dict(max_seq_len=48), None),
    "all-at-once": ({}, dict(n_layers=4, n_heads=6, d_head=8, d_mlp=96), [0, 2]),
    "gqa": (dict(n_heads=4, n_kv_heads=2), dict(n_heads=8, n_kv_heads=4, d_head=4), None),
    "swiglu-rmsnorm-bias": (
        dict(activation="swiglu", norm="rmsnorm", bias=True),
        dict(activation="swiglu", norm="rmsnorm", bias=True, n_layers=3, n_heads=4, d_head=8),
        None,
    ),
    "rope-untied": (
        dict(positions="rope", tie_embeddings=False),
        dict(positions="rope", tie_embeddings=False, n_layers=3, n_heads=3, d_head=8),
        [0, 2],
    ),
    "post-norm": (
        dict(norm_placement="post"),
        dict(norm_placement="post", n_heads=4, d_head=8, d_mlp=80),
        None,
    ),
    "no-residual": (dict(residual="none"), dict(residual="none", n_heads=3, d_head=8), None),
    "wider-residual-no-norm": (
        dict(norm="none"),
        dict(norm="none", d_model=24, n_heads=3, d_head=8, n_layers=3, d_mlp=100),
        None,
    ),
    "wider-residual-untied-bias": (
        dict(norm="none", tie_embeddings=False, bias=True),
        dict(norm="none", tie_embeddings=False, bias=True, d_model=32, n_heads=4, d_head=8),
        None,
    ),
}


def _pair(small_knobs: dict, large_knobs: dict, seed: int = 0) -> tuple[Transformer, ModelConfig]:
    small_cfg = ModelConfig(**{**SMALL, **small_knobs})
    # A small model whose every weight matters: random, with biases and gains moved off 0/1.
    small = Transformer(small_cfg, generator=torch.Generator().manual_seed(seed + 100))
    with torch.no_grad():
        for p in small.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return small, ModelConfig(**{**SMALL, **small_knobs, **large_knobs})


@pytest.mark.parametrize("case", list(CASES))
def test_grown_model_computes_the_small_models_function(case):
    small_knobs, large_knobs, layer_map = CASES[case]
    small, large_cfg = _pair(small_knobs, large_knobs)
    plan = GrowthPlan.of(small.config, large_cfg, layer_map)
    grown = grow_model(small, plan, seed=7)
    tokens = torch.randint(0, SMALL["vocab_size"], (6, 24), generator=torch.Generator())
    assert max_logit_difference(small, grown, tokens) <= 1e-5
    # The grown model is really larger, and its new units are not all zero (they can learn).
    n_small = sum(p.numel() for p in small.parameters())
    assert sum(p.numel() for p in grown.parameters()) > n_small


def test_new_units_are_fresh_initialisation_and_write_nothing():
    small, large_cfg = _pair({}, dict(n_layers=3, n_heads=4, d_head=8, d_mlp=100))
    grown = grow_model(small, GrowthPlan.of(small.config, large_cfg), seed=3)
    fresh = Transformer(large_cfg, generator=torch.Generator().manual_seed(3))
    new_heads = slice(16, 32)  # heads 2 and 3 of 8 channels
    new_q = grown.blocks[0].attn.q_proj.weight[new_heads]
    assert torch.equal(new_q, fresh.blocks[0].attn.q_proj.weight[new_heads])
    assert torch.equal(grown.blocks[0].mlp.up.weight[64:], fresh.blocks[0].mlp.up.weight[64:])
    assert grown.blocks[0].attn.o_proj.weight[:, new_heads].abs().sum() == 0
    assert grown.blocks[0].mlp.down.weight[:, 64:].abs().sum() == 0
    assert grown.blocks[2].attn.o_proj.weight.abs().sum() == 0  # the new layer
    assert torch.equal(grown.blocks[2].attn.q_proj.weight, fresh.blocks[2].attn.q_proj.weight)
    assert torch.equal(grown.blocks[1].mlp.up.weight[:64], small.blocks[1].mlp.up.weight)
    # One training step moves the new units: zero outputs still pass gradient.
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 24))
    loss, _ = grown.training_loss(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert grown.blocks[0].attn.o_proj.weight.grad[:, new_heads].abs().sum() > 0
    assert grown.blocks[2].mlp.down.weight.grad.abs().sum() > 0


REFUSED = {
    "narrower": (dict(d_model=8, n_heads=1), "d_model 8 < 16"),
    "fewer-layers": (dict(n_layers=1), "n_layers 1 < 2"),
    "fewer-heads": (dict(n_heads=1, d_head=8), "n_heads 1 < 2"),
    "smaller-mlp": (dict(d_mlp=32), "MLP width 32 < small layer 0's 64"),
    "shorter-context": (dict(max_seq_len=16), "max_seq_len 16 < 24"),
    "head-dim-changes": (dict(n_heads=4), "set model.d_head = 8"),
    "wider-with-layernorm": (dict(d_model=32, n_heads=4), "not exact with norm='layernorm'"),
    "other-vocab": (dict(vocab_size=62), "vocab_size"),
    "other-activation": (dict(activation="relu"), "activation"),
    "other-positions": (dict(positions="rope"), "positions"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_config_that_cannot_hold_the_model_exactly_is_refused(case):
    knobs, message = REFUSED[case]
    small, _ = _pair({}, {})
    with pytest.raises(NnobsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        GrowthPlan.of(small.config, ModelConfig(**{**SMALL, **knobs}))


@pytest.mark.parametrize(
    ("small_knobs", "large_knobs", "layer_map", "message"),
    [
        ({}, dict(n_layers=4), [2, 1], "increasing"),
        ({}, dict(n_layers=4), [0, 4], "distinct large layer in 0..3"),
        ({}, dict(n_layers=4), [0], "distinct large layer"),
        (dict(norm_placement="post"), dict(norm_placement="post", n_layers=3), None, "pre-norm"),
        (dict(residual="none"), dict(residual="none", n_layers=3), None, "pre-norm"),
        (dict(n_heads=2, n_kv_heads=1), dict(n_heads=4, d_head=8), None, "group size"),
        (dict(residual="attnres"), dict(residual="attnres"), None, "not 'attnres'"),
    ],
)
def test_layer_maps_and_architectures_grow_cannot_keep_exact(
    small_knobs, large_knobs, layer_map, message
):
    small, large_cfg = _pair(small_knobs, large_knobs)
    with pytest.raises(NnobsError, match=message):
        GrowthPlan.of(small.config, large_cfg, layer_map)


# ----------------------------------------------------------------------------- as a run


LARGE_TOML = """
[model]
vocab_size = 257
d_model = 32
n_layers = 3
n_heads = 6
d_head = 8
d_mlp = 192
max_seq_len = 64

[train]
corpus = "{corpus}"
tokenizer = "byte"
seq_len = 64
batch_size = 8
steps = {steps}
lr = 1e-2
warmup_steps = 4
eval_every = 8
eval_batches = 2
log_every = 4
first_checkpoint = 8
checkpoint_every = 16
device = "cpu"
"""


@pytest.fixture
def large_toml(tmp_path, python_corpus):
    path = tmp_path / "large.toml"
    path.write_text(LARGE_TOML.format(corpus=python_corpus, steps=8))
    return path


def test_grow_command_writes_a_run_that_trains_on_from_the_grown_weights(
    python_run, large_toml, tmp_path, capsys, one_thread
):
    from nnobs.cli import main
    from nnobs.models.checkpoint import load_checkpoint
    from nnobs.training.runconfig import load_run_config
    from nnobs.training.trainer import train

    out = tmp_path / "grown"
    argv = ["grow", "--small", python_run, "--config", large_toml, "--out", out]
    assert main([str(a) for a in argv]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["max_logit_difference"] <= 1e-5 and printed["layer_map"] == [0, 1]
    run = json.loads((out / "run.json").read_text())
    assert run["grown_from"]["run"] == str(python_run.resolve())
    assert run["grown_from"]["checkpoint"]["step"] == 24
    assert run["model_config"]["n_heads"] == 6
    grown = load_checkpoint(out, step=0).model
    small = load_checkpoint(python_run).model
    tokens = torch.randint(0, 257, (4, 64))
    assert max_logit_difference(small, grown, tokens) <= 1e-5
    mc, tc = load_run_config(None, large_toml)
    result = train(mc, tc, out, progress=False)
    assert result.step == 8 and result.resumed_from == 0
    trained = load_checkpoint(out).model
    assert max_logit_difference(small, trained, tokens) > 1e-3  # it trained on


def test_grow_refusals_write_nothing(
    python_run, python_corpus, large_toml, tmp_path, expect_refusal
):
    out = tmp_path / "grown"
    base = ["grow", "--small", python_run, "--config", large_toml, "--out", out]
    unfinished = tmp_path / "unfinished"
    shutil.copytree(python_run, unfinished)
    shutil.rmtree(unfinished / "checkpoints" / "step_000024")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    rows = [
        (["--set", "model.d_model=16", "--set", "model.d_head=4"], "d_model 16 < 32"),
        (["--set", "model.n_layers=1"], "n_layers 1 < 2"),
        (["--set", "model.d_mlp=64"], "MLP width 64 < small layer 0's 128"),
        (["--set", "model.vocab_size=300"], "vocab_size"),
        (["--set", 'train.tokenizer="bpe"'], "a grown model keeps its parent's tokenizer"),
        (["--set", "model.d_model=64", "--set", "model.n_heads=8"], "not exact with norm"),
        (["--layer-map", "1,0", "--set", "model.n_layers=3"], "increasing"),
    ]
    for extra, message in rows:
        expect_refusal([*base, *extra], message, watch=[tmp_path])
    expect_refusal(
        ["grow", "--small", unfinished, "--config", large_toml, "--out", out],
        "has no finished checkpoint",
        watch=[tmp_path],
    )
    expect_refusal(
        ["grow", "--small", python_corpus, "--config", large_toml, "--out", out],
        "not an nnobs run directory",
        watch=[tmp_path],
    )
    expect_refusal([*base[:-1], tmp_path / "full"], "is not empty", watch=[tmp_path])


def test_a_grown_model_that_is_not_exact_is_refused_and_nothing_written(
    python_run, large_toml, tmp_path, monkeypatch, one_thread
):
    import nnobs.seeding.grown_run as grown_run
    from nnobs.training.runconfig import load_run_config

    def off_by_a_little(small, plan, seed=0):
        grown = grow_model(small, plan, seed)
        with torch.no_grad():
            grown.blocks[0].mlp.down.weight[0, 0] += 0.5
        return grown

    monkeypatch.setattr(grown_run, "grow_model", off_by_a_little)
    mc, tc = load_run_config(None, large_toml)
    with pytest.raises(NnobsError, match="not function-preserving; nothing written"):
        grown_run.grow_run(python_run, mc, tc, tmp_path / "grown")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["large.toml"]
