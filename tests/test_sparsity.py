"""Weight-sparse training: the mask, its schedule, the optimiser settings, and exact resume."""

import json
import math

import pytest
import torch
from test_train import TC, assert_same_weights, sigkill_then_resume, weights

from nnobs.core.errors import NnobsError
from nnobs.models.config import ModelConfig
from nnobs.training.config import TrainConfig
from nnobs.training.runconfig import load_run_config
from nnobs.training.schedule import kept_fraction_at, lr_at
from nnobs.training.sparsity import floor_mask, keep_largest, kept_count
from nnobs.training.trainer import normalise_grad_rms_, train

# The paper's architecture at test size: RMSNorm, untied embeddings, 8-channel heads, biases.
SPARSE_MC = ModelConfig(
    vocab_size=257, d_model=32, n_layers=2, n_heads=4, d_head=8, max_seq_len=32,
    norm="rmsnorm", tie_embeddings=False, bias=True,
)  # fmt: skip
SPARSE_TC = TC.replace(
    weight_keep=0.1, min_nonzero=2, sparse_biases=True, keep_anneal=[0.1, 0.5], adam_eps=0.1,
    grad_clip=0.0, grad_rms_normalise=True, lr_schedule="linear", lr_keep_scaling=True,
)  # fmt: skip


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("NNOBS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_keep_largest_keeps_exactly_the_largest_entries():
    w = torch.randn(20, 30, generator=torch.Generator().manual_seed(0))
    kept = w.clone()
    keep_largest(kept, 0.1)
    assert int((kept != 0).sum()) == kept_count(600, 0.1) == 60
    threshold = w.abs().flatten().topk(60).values.min()
    assert torch.equal(kept != 0, w.abs() >= threshold)
    assert torch.equal(kept[kept != 0], w[kept != 0])  # kept values untouched


def test_the_floor_gives_every_row_and_column_its_largest_entries():
    # The 12 largest entries (the kept count) all sit in row 0: without a floor every
    # other row is empty.
    w = torch.rand(10, 12, generator=torch.Generator().manual_seed(0)) + 0.01
    w[0] += 10
    plain, floored = w.clone(), w.clone()
    keep_largest(plain, 0.1)
    keep_largest(floored, 0.1, per_unit=2)
    assert (plain[1:] == 0).all()
    nonzero = floored != 0
    assert (nonzero.sum(1) >= 2).all() and (nonzero.sum(0) >= 2).all()
    assert nonzero[floor_mask(w.abs(), 2)].all()
    # The floor here needs more than the kept count: the matrix holds exactly the floor.
    assert int(nonzero.sum()) == int(floor_mask(w.abs(), 2).sum()) > kept_count(120, 0.1)
    looser = w.clone()
    keep_largest(looser, 0.5, per_unit=2)
    assert int((looser != 0).sum()) == 60  # the floor fits inside the kept count


def test_kept_fraction_anneals_linearly_between_the_anneal_points():
    tc = TrainConfig(steps=1000, weight_keep=0.01, keep_anneal=[0.01, 0.5])
    assert kept_fraction_at(0, tc) == kept_fraction_at(10, tc) == 1.0
    assert kept_fraction_at(255, tc) == pytest.approx(1 - 0.99 * 245 / 490)
    assert kept_fraction_at(500, tc) == kept_fraction_at(1000, tc) == 0.01


def test_sharkfin_learning_rate():
    tc = TrainConfig(
        steps=1000, lr=1e-3, warmup_steps=10, min_lr_ratio=0.0, lr_schedule="linear",
        weight_keep=0.04, keep_anneal=[0.01, 0.5], lr_keep_scaling=True,
    )  # fmt: skip
    assert lr_at(4, tc) == pytest.approx(1e-3 * 5 / 10)
    # After the anneal: linear decay times 1/sqrt(0.04) = 5.
    assert lr_at(505, tc) == pytest.approx(5 * 1e-3 * (1 - 495 / 990))
    assert lr_at(999, tc) == pytest.approx(5 * 1e-3 * (1 - 989 / 990))
    dense = tc.replace(lr_keep_scaling=False, lr_schedule="cosine")
    assert lr_at(505, dense) == pytest.approx(0.5 * 1e-3 * (1 + math.cos(math.pi * 495 / 990)))


def test_new_settings_at_their_defaults_are_not_stored():
    """Existing runs' stored train configs hold none of them, and must still resume."""
    stored = TC.to_dict()
    assert "weight_keep" not in stored and "adam_eps" not in stored
    assert TrainConfig.from_dict(stored) == TC
    assert SPARSE_TC.to_dict()["keep_anneal"] == [0.1, 0.5]
    assert TrainConfig.from_dict(SPARSE_TC.to_dict()) == SPARSE_TC


@pytest.mark.parametrize(
    "change, message",
    [
        ({"weight_keep": 0.0}, "train.weight_keep must be a number in (0, 1]"),
        ({"weight_keep": 1.5}, "train.weight_keep must be a number in (0, 1]"),
        ({"min_nonzero": -1}, "train.min_nonzero must be an integer >= 0"),
        ({"keep_anneal": [0.6, 0.5]}, "train.keep_anneal must be two fractions"),
        ({"keep_anneal": [0.1]}, "train.keep_anneal must be two fractions"),
        ({"adam_eps": 0}, "train.adam_eps must be a number > 0"),
        ({"grad_rms_clip": -1}, "train.grad_rms_clip must be a number >= 0"),
        ({"lr_schedule": "step"}, "unknown train.lr_schedule 'step'"),
        ({"tokenizer": "bpe2"}, "unknown tokenizer 'bpe2': choose one of bpe, bpe_tasks, byte"),
    ],
)
def test_bad_settings_are_one_clear_error(change, message):
    with pytest.raises(NnobsError, match=message.replace("(", r"\(").replace("]", r"\]")):
        TrainConfig(**change)


class MomentsStayDense:
    """Runs after the sparsity hook: checks the mask and that Adam's moments are dense."""

    def __init__(self):
        self.checked = 0

    def on_step(self, model, optimizer, step):
        if step < 6:  # past the anneal's start: masks are in force
            return
        w = model.blocks[0].mlp.up.weight
        exp_avg = optimizer.state[w]["exp_avg"]
        assert (w == 0).any() and (exp_avg[w == 0] != 0).any()
        self.checked += 1


def test_gradients_are_divided_by_their_global_rms():
    params = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5))]
    params[0].grad = torch.full((3, 4), 1e-3)
    params[1].grad = torch.arange(5.0) * 1e-4
    before = torch.cat([p.grad.flatten() for p in params])
    normalise_grad_rms_(params)
    after = torch.cat([p.grad.flatten() for p in params])
    assert after.square().mean().sqrt().item() == pytest.approx(1.0, rel=1e-6)
    assert torch.allclose(after / after.norm(), before / before.norm())


def test_with_epsilon_0_1_normalised_gradients_train_and_raw_ones_barely_move(tmp_path):
    """AdamW with epsilon 0.1 on raw gradients (RMS ~1e-3) is SGD with a tiny rate."""
    tc = TC.replace(steps=12, eval_every=12, adam_eps=0.1, grad_clip=0.0)
    raw = train(SPARSE_MC, tc, tmp_path / "raw", progress=False)
    normalised = train(
        SPARSE_MC, tc.replace(grad_rms_normalise=True), tmp_path / "n", progress=False
    )
    start = math.log(SPARSE_MC.vocab_size)
    assert start - normalised.val_loss > 2 * (start - raw.val_loss)  # 1.8 vs 0.5 nats


def test_after_training_every_matrix_holds_its_kept_fraction_and_floor(tmp_path):
    check = MomentsStayDense()
    train(SPARSE_MC, SPARSE_TC, tmp_path, progress=False, hooks=[check])
    assert check.checked == SPARSE_TC.steps - 5
    final = weights(tmp_path)
    assert not (weights(tmp_path, 0)["blocks.0.mlp.up.weight"] == 0).any()  # dense at start
    for name, w in final.items():
        nonzero = w != 0
        if w.dim() == 2:
            floor = floor_mask(w.abs(), 2)
            assert nonzero[floor].all(), name
            assert int(nonzero.sum()) == max(kept_count(w.numel(), 0.1), int(floor.sum())), name
            assert (nonzero.sum(0) >= 2).all() and (nonzero.sum(1) >= 2).all(), name
        elif name.endswith(".bias"):
            assert int(nonzero.sum()) == kept_count(w.numel(), 0.1), name
        else:  # norm gains stay dense
            assert nonzero.all(), name
    assert {"tok_emb.weight", "unembed.weight", "pos_emb.weight"} <= set(final)
    stored = json.loads((tmp_path / "run.json").read_text())["train_config"]
    assert stored["weight_keep"] == 0.1 and stored["min_nonzero"] == 2


def test_a_sparse_run_resumed_from_an_earlier_checkpoint_is_exact(tmp_path):
    train(SPARSE_MC, SPARSE_TC, tmp_path / "full", progress=False)
    out = tmp_path / "cut"
    train(SPARSE_MC, SPARSE_TC, out, progress=False)
    for step in (8, 12):  # as if killed just after step 4 was saved
        (out / "checkpoints" / f"step_{step:06d}").rename(
            out / "checkpoints" / f".tmp-step_{step:06d}-x"
        )
    assert train(SPARSE_MC, SPARSE_TC, out, progress=False).resumed_from == 4
    assert_same_weights(weights(tmp_path / "full"), weights(out))


def test_the_sparse_and_dense_presets_differ_only_in_sparsity():
    sparse_mc, sparse_tc = load_run_config("sparse", None, [])
    dense_mc, dense_tc = load_run_config("dense", None, [])
    assert sparse_mc == dense_mc
    assert sparse_mc.norm == "rmsnorm" and not sparse_mc.tie_embeddings
    assert sparse_mc.head_dim == 16 and sparse_tc.tokenizer == "bpe_tasks"
    assert sparse_tc.replace(weight_keep=1.0, min_nonzero=0) == dense_tc
    assert sparse_tc.sparse and not dense_tc.sparse
    assert sparse_tc.adam_eps == 0.1 and sparse_tc.grad_rms_normalise
    assert sparse_tc.warmup_steps == sparse_tc.steps // 100


@pytest.mark.slow
def test_sigkill_then_resume_of_a_sparse_run_is_bit_identical(tmp_path):
    sigkill_then_resume(
        tmp_path,
        ["--set", "train.weight_keep=0.1", "--set", "train.min_nonzero=2",
         "--set", "train.grad_rms_normalise=true", "--set", "train.lr_keep_scaling=true",
         "--set", "train.keep_anneal=[0.05,0.5]"],
    )  # fmt: skip


def test_activation_sparsity_keeps_a_quarter_of_the_channels_at_every_location():
    from nnobs.models.adapter import nnobs_adapter
    from nnobs.models.transformer import Transformer

    mc = SPARSE_MC.replace(act_keep=0.25)
    assert "act_keep" not in SPARSE_MC.to_dict() and mc.hash != SPARSE_MC.hash
    model = Transformer(mc, generator=torch.Generator().manual_seed(0)).eval()
    dense = Transformer(SPARSE_MC, generator=torch.Generator().manual_seed(0)).eval()
    ids = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(1))
    _, cache = nnobs_adapter(model).run_with_cache(
        ids, ["blocks.0.mlp_hidden", "blocks.1.attn_out", "blocks.1.mlp_out"]
    )
    for site, x in cache.items():
        assert ((x != 0).sum(-1) == round(0.25 * x.shape[-1])).all(), site
    seen = {}
    model.blocks[0].attn.q_proj.register_forward_hook(lambda m, i, o: seen.update(x=i[0]))
    model(ids)
    assert ((seen["x"] != 0).sum(-1) == 8).all()  # the normed input: 8 of 32 channels
    assert not torch.equal(model(ids), dense(ids))
    loss, _ = model.training_loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    assert torch.isfinite(loss) and model.blocks[0].mlp.up.weight.grad.abs().sum() > 0
    with pytest.raises(NnobsError, match="model.act_keep must be a number in"):
        SPARSE_MC.replace(act_keep=0)


def test_attention_sinks_let_a_head_attend_to_nothing():
    from nnobs.models.adapter import nnobs_adapter
    from nnobs.models.transformer import Transformer

    mc = SPARSE_MC.replace(attn_sinks=True, positions="none")
    assert mc.to_dict()["attn_sinks"] and "attn_sinks" not in SPARSE_MC.to_dict()
    model = Transformer(mc, generator=torch.Generator().manual_seed(0)).eval()
    assert model.pos_emb is None and model.blocks[0].attn.sink.shape == (4,)
    plain = Transformer(mc.replace(attn_sinks=None), generator=torch.Generator().manual_seed(0))
    plain.eval()
    ids = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(1))
    sites = ["blocks.0.attn_pattern", "blocks.0.head_out"]
    with torch.no_grad():
        for block in model.blocks:  # a sink no key can outbid: the plain model exactly
            block.attn.sink.fill_(-1e4)
        _, cache = nnobs_adapter(model).run_with_cache(ids, sites)
        torch.testing.assert_close(model(ids), plain(ids))
        assert torch.allclose(cache["blocks.0.attn_pattern"].sum(-1), torch.ones(2, 4, 12))
        model.blocks[0].attn.sink[1] = 1e4  # head 1 now attends to nothing
        _, cache = nnobs_adapter(model).run_with_cache(ids, sites)
    assert cache["blocks.0.attn_pattern"][:, 1].abs().max() < 1e-6
    assert cache["blocks.0.head_out"][:, :, 1].abs().max() < 1e-6
    assert cache["blocks.0.head_out"][:, :, 0].abs().max() > 1e-3
    loss, _ = model.training_loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    assert model.blocks[1].attn.sink.grad is not None
