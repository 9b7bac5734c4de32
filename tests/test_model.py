"""The transformer's knobs, hook sites and parameter matching."""

import pytest
import torch

from nnobs.core.errors import NnobsError
from nnobs.models.adapter import nnobs_adapter
from nnobs.models.config import CHOICES, ModelConfig
from nnobs.models.init import init_weights
from nnobs.models.sizing import count_params, match_params
from nnobs.models.transformer import RESIDUAL_PATHS, AddResidual, Transformer

SMALL = dict(vocab_size=50, d_model=32, n_layers=3, n_heads=4, max_seq_len=12)


def build(**changes) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**SMALL, **changes})).eval()


def tokens(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(
        0, SMALL["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(1)
    )


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        {"activation": "relu"},
        {"activation": "swiglu"},
        {"norm": "rmsnorm"},
        {"norm": "none"},
        {"norm_placement": "post"},
        {"residual": "none"},
        {"positions": "rope"},
        {"n_kv_heads": 2},
        {"n_kv_heads": 1},
        {"tie_embeddings": False},
        {"d_mlp": [64, 4, 64]},
        {"bias": True},
    ],
)
def test_every_knob_builds_and_is_causal(knobs):
    model = build(**knobs)
    ids = tokens()
    logits = model(ids)
    assert logits.shape == (2, 12, SMALL["vocab_size"])
    assert torch.isfinite(logits).all()
    # Causality: changing the last token leaves every earlier position's logits unchanged.
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % SMALL["vocab_size"]
    torch.testing.assert_close(model(changed)[:, :-1], logits[:, :-1])


def test_knobs_change_the_architecture():
    base = count_params(ModelConfig(**SMALL))
    assert count_params(ModelConfig(**SMALL, tie_embeddings=False)) == base + 50 * 32
    assert count_params(ModelConfig(**SMALL, n_kv_heads=1)) < base
    swiglu = count_params(ModelConfig(**SMALL, activation="swiglu"))
    assert swiglu - base == 3 * 32 * 128  # one extra d_model x d_mlp gate per layer
    bottleneck = build(d_mlp=[64, 4, 64])
    assert bottleneck.blocks[1].mlp.up.out_features == 4
    rope = build(positions="rope")
    assert rope.pos_emb is None and count_params(rope.config) == base - 12 * 32


def test_residual_none_and_post_norm_wire_the_block_as_documented():
    model = build(residual="none", norm="none")
    adapter = nnobs_adapter(model)
    _, cache = adapter.run_with_cache(tokens(), ["blocks.0.resid_mid", "blocks.0.attn_out"])
    torch.testing.assert_close(cache["blocks.0.resid_mid"], cache["blocks.0.attn_out"])

    post = build(norm_placement="post")
    sites = ["blocks.0.resid_pre", "blocks.0.attn_out", "blocks.0.resid_mid"]
    _, cache = nnobs_adapter(post).run_with_cache(tokens(), sites)
    expected = post.blocks[0].norm1(cache["blocks.0.resid_pre"] + cache["blocks.0.attn_out"])
    torch.testing.assert_close(cache["blocks.0.resid_mid"], expected)


def test_pre_norm_residual_stream_is_a_running_sum():
    adapter = nnobs_adapter(build())
    names = [
        f"blocks.1.{k}" for k in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
    ]
    _, c = adapter.run_with_cache(tokens(), names + ["blocks.0.resid_post"])
    torch.testing.assert_close(c["blocks.1.resid_pre"], c["blocks.0.resid_post"])
    torch.testing.assert_close(
        c["blocks.1.resid_mid"], c["blocks.1.resid_pre"] + c["blocks.1.attn_out"]
    )
    torch.testing.assert_close(
        c["blocks.1.resid_post"], c["blocks.1.resid_mid"] + c["blocks.1.mlp_out"]
    )


def test_every_site_has_its_documented_shape_and_reading_it_changes_nothing():
    model = build(n_kv_heads=2, d_mlp=[64, 4, 64])
    adapter = nnobs_adapter(model)
    ids = tokens()
    plain = model(ids)
    logits, cache = adapter.run_with_cache(ids, list(adapter.sites))
    torch.testing.assert_close(
        logits, plain, atol=1e-5, rtol=0
    )  # the pattern site swaps the fused kernel
    assert cache["embed"].shape == (2, 12, 32)
    assert cache["blocks.2.attn_pattern"].shape == (2, 4, 12, 12)
    torch.testing.assert_close(cache["blocks.2.attn_pattern"].sum(-1), torch.ones(2, 4, 12))
    assert cache["blocks.0.head_out"].shape == (2, 12, 4, 8)
    assert cache["blocks.1.mlp_hidden"].shape == (2, 12, 4)
    assert cache["final"].shape == (2, 12, 32)
    # Without the pattern site the hooked pass is bit-identical.
    no_pattern = [s for s in adapter.sites if not s.endswith("attn_pattern")]
    logits, _ = adapter.run_with_cache(ids, no_pattern)
    assert torch.equal(logits, plain)


def test_an_edit_changes_the_output_exactly_as_asked():
    model = build()
    adapter = nnobs_adapter(model)
    ids = tokens()
    _, cache = adapter.run_with_cache(ids, ["blocks.2.resid_post"])
    shift = torch.randn(32, generator=torch.Generator().manual_seed(3))
    logits, _ = adapter.run_with_cache(ids, [], edits={"blocks.2.resid_post": lambda h: h + shift})
    torch.testing.assert_close(logits, model.readout(cache["blocks.2.resid_post"] + shift))

    def zero_head(h):
        h = h.clone()
        h[:, :, 1] = 0
        return h

    _, edited = adapter.run_with_cache(
        ids, ["blocks.0.head_out"], edits={"blocks.0.head_out": zero_head}
    )
    assert edited["blocks.0.head_out"][:, :, 1].abs().max() == 0


def test_unknown_sites_and_layers_get_one_clear_error():
    adapter = nnobs_adapter(build())
    with pytest.raises(NnobsError, match="layer 7 is out of range"):
        adapter.resolve("blocks.7.resid_post")
    with pytest.raises(NnobsError, match="unknown hook site"):
        adapter.resolve("blocks.0.residual")
    with pytest.raises(NnobsError, match="out of range"):
        adapter.site_name(3)
    assert adapter.site_name(-1) == "blocks.2.resid_post"


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"activation": "tanh"}, "unknown activation 'tanh'"),
        ({"norm_placement": "middle"}, "unknown norm_placement"),
        ({"d_model": 30}, "not divisible by n_heads"),
        ({"n_kv_heads": 3}, "must divide n_heads"),
        ({"d_mlp": [64, 64]}, "one per layer"),
        ({"aux_layer": 5, "aux_weight": 0.5}, "aux_layer=5 is out of range"),
    ],
)
def test_bad_knob_values_are_rejected(bad, message):
    with pytest.raises(NnobsError, match=message):
        ModelConfig(**{**SMALL, **bad})


def test_unknown_knob_names_are_rejected():
    with pytest.raises(NnobsError, match="unknown model knob"):
        ModelConfig.from_dict({**SMALL, "width": 3})


def test_match_params_brings_two_architectures_within_one_percent():
    shallow = ModelConfig(vocab_size=500, d_model=64, n_layers=2, n_heads=2)
    deep = ModelConfig(vocab_size=500, d_model=64, n_layers=6, n_heads=8)
    matched = match_params(deep, shallow, knob="d_mlp")
    assert matched.n_layers == 6 and matched.n_heads == 8
    assert abs(count_params(matched) - count_params(shallow)) / count_params(shallow) < 0.01
    wide = match_params(
        ModelConfig(vocab_size=500, d_model=32, n_layers=2, n_heads=1), deep, "d_model"
    )
    assert abs(count_params(wide) - count_params(deep)) / count_params(deep) < 0.01
    bottleneck = match_params(deep.replace(d_mlp=[256, 256, 16, 256, 256, 256]), deep)
    widths = bottleneck.mlp_widths
    assert widths[0] > 256 and widths[2] <= widths[0] / 12  # the bottleneck keeps its shape


def test_intermediate_supervision_adds_an_auxiliary_loss():
    model = build(aux_layer=1, aux_weight=0.5).train()
    ids = tokens()
    loss, parts = model.training_loss(ids[:, :-1], ids[:, 1:])
    torch.testing.assert_close(loss, parts["lm_loss"] + 0.5 * parts["aux_loss"])
    plain, parts = build().train().training_loss(ids[:, :-1], ids[:, 1:])
    assert set(parts) == {"lm_loss"}


def test_aux_loss_reads_out_the_stream_after_its_layer():
    model = build(aux_layer=1, aux_weight=0.5)
    ids = tokens()
    with nnobs_adapter(model).hooks(["blocks.1.resid_post"]) as cache:
        _, parts = model.training_loss(ids[:, :-1], ids[:, 1:])
    logits = model.unembed(model.final_norm(cache["blocks.1.resid_post"]))
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(parts["aux_loss"], expected)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_init_weights_draws_from_its_generator_alone():
    model = Transformer(ModelConfig(**SMALL, bias=True))
    drawn = []
    for seed in (3, 3, 4):
        init_weights(model, torch.Generator().manual_seed(seed))
        drawn.append(weights(model))
    first, same, other = drawn
    assert all(torch.equal(first[name], same[name]) for name in first)
    assert not torch.equal(
        first["blocks.0.attn.q_proj.weight"], other["blocks.0.attn.q_proj.weight"]
    )
    assert torch.equal(first["blocks.0.attn.q_proj.bias"], torch.zeros(32))  # biases start at 0
    std = {
        name: float(first[name].std()) for name in ("tok_emb.weight", "blocks.2.mlp.down.weight")
    }
    assert std["tok_emb.weight"] == pytest.approx(0.02, rel=0.05)
    assert std["blocks.2.mlp.down.weight"] == pytest.approx(0.02 / 6**0.5, rel=0.05)  # by depth


def test_a_seeded_generator_builds_what_global_seeding_built():
    config = ModelConfig(**SMALL)
    torch.manual_seed(7)
    expected = weights(Transformer(config))
    state = torch.get_rng_state()
    model = Transformer(config, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone
    assert all(torch.equal(p, expected[name]) for name, p in weights(model).items())


def test_residual_strategies_add_or_replace():
    assert set(RESIDUAL_PATHS) == set(CHOICES["residual"])
    stream, out = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert torch.equal(RESIDUAL_PATHS["add"]().write(stream, out), stream + out)
    assert torch.equal(RESIDUAL_PATHS["none"]().write(stream, out), out)
    for residual in ("add", "none"):  # the stateless strategies read the plain stream
        assert RESIDUAL_PATHS[residual]().read(stream, None) is stream


def test_a_strategy_that_asks_for_sources_is_handed_every_earlier_output():
    model = build()
    adapter = nnobs_adapter(model)
    sublayers = [f"blocks.{layer}.{kind}" for layer in range(3) for kind in ("attn_out", "mlp_out")]
    with torch.no_grad(), adapter.hooks(["embed", *sublayers]) as cache:
        plain = model(tokens())
    seen: list[list[torch.Tensor]] = []

    class Recording(AddResidual):
        uses_sources = True

        def read(self, stream, sources):
            seen.append(list(sources))
            return stream

    for block in model.blocks:
        block.residual = Recording()
    with torch.no_grad():
        assert torch.equal(model(tokens()), plain)
    assert [len(sources) for sources in seen] == [1, 2, 3, 4, 5, 6]
    names = ["embed", *sublayers]  # every source but the last MLP's output, in order
    for name, source in zip(names[:-1], seen[-1], strict=True):
        assert torch.equal(source, cache[name]), name


def test_config_hash_is_stable_and_a_legacy_empty_extra_is_dropped():
    # Hashes earlier versions wrote (the default and the tiny preset's model) still match.
    assert ModelConfig().hash == "efc5462c2bcd"
    tiny = ModelConfig(vocab_size=257, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)
    assert tiny.hash == "997105463a8a"
    legacy = {**ModelConfig(**SMALL).to_dict(), "extra": {}}
    assert ModelConfig.from_dict(legacy) == ModelConfig(**SMALL)
    assert "extra" not in ModelConfig().to_dict()
    with pytest.raises(NnobsError, match="unknown model knob"):
        ModelConfig.from_dict({**legacy, "extra": {"width": 3}})
