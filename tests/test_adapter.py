"""The adapter on nnobs models: every site, reads that change nothing, edits that do exactly
what they say."""

from __future__ import annotations

import pytest
import torch

from nnobs.core.errors import NnobsError
from nnobs.models.adapter import nnobs_adapter
from nnobs.models.config import ModelConfig
from nnobs.models.transformer import Transformer

SMALL = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4, max_seq_len=32)
VARIANTS = {
    "default": {},
    "gqa-rope-swiglu-bottleneck": dict(
        n_kv_heads=2, positions="rope", activation="swiglu", d_mlp=[64, 8, 64], norm="rmsnorm"
    ),
    "post-norm": dict(norm_placement="post"),
    "no-residual": dict(residual="none", norm="none"),
}


def build(**knobs) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**SMALL, **knobs})).eval()


def tokens(batch: int = 2, pos: int = 10) -> torch.Tensor:
    return torch.randint(0, 64, (batch, pos), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_all_sites_present_with_documented_shapes(variant):
    model = build(**VARIANTS[variant])
    adapter = nnobs_adapter(model)
    cfg = model.config
    kinds = ("resid_pre", "attn_pattern", "head_out", "attn_out", "resid_mid", "mlp_hidden")
    expected = {"embed", "final"} | {
        f"blocks.{l}.{k}" for l in range(3) for k in (*kinds, "mlp_out", "resid_post")
    }
    assert set(adapter.sites) == expected
    _, cache = adapter.run_with_cache(tokens(), list(adapter.sites))
    for site, value in cache.items():
        layer = int(site.split(".")[1]) if site.startswith("blocks.") else None
        shape = {
            "attn_pattern": (2, cfg.n_heads, 10, 10),
            "head_out": (2, 10, cfg.n_heads, cfg.head_dim),
            "mlp_hidden": (2, 10, cfg.mlp_widths[layer or 0]),
        }.get(site.rsplit(".", 1)[-1], (2, 10, cfg.d_model))
        assert tuple(value.shape) == shape, site


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reading_sites_does_not_change_logits(variant):
    model = build(**VARIANTS[variant])
    adapter = nnobs_adapter(model)
    ids = tokens()
    with torch.no_grad():
        plain = model(ids)
    reads = [s for s in adapter.sites if not s.endswith("attn_pattern")]
    logits, _ = adapter.run_with_cache(ids, reads)
    assert torch.equal(logits, plain)
    # Reading the pattern materialises attention instead of the fused kernel: same numbers.
    logits, _ = adapter.run_with_cache(ids, list(adapter.sites))
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=0)
    assert not any(hp._forward_hooks for hp in model.hook_points().values())


def test_zeroing_the_last_mlp_leaves_the_stream_before_it():
    adapter = nnobs_adapter(build())
    ids = tokens()
    clean_logits, clean = adapter.run_with_cache(ids, ["blocks.2.resid_mid"])
    logits, _ = adapter.run_with_cache(ids, [], edits={"blocks.2.mlp_out": torch.zeros_like})
    assert (logits - clean_logits).abs().max() > 1e-3
    torch.testing.assert_close(logits, adapter.unembed_fn(clean["blocks.2.resid_mid"]))


def test_head_and_neuron_edits_pass_through_the_output_projections():
    model = build()
    adapter = nnobs_adapter(model)
    ids = tokens()
    _, clean = adapter.run_with_cache(ids, ["blocks.1.head_out", "blocks.1.mlp_hidden"])

    def drop_head(h):
        h = h.clone()
        h[:, :, 3] = 0
        return h

    def halve_neurons(h):
        return torch.cat([h[..., :16] * 0.5, h[..., 16:]], dim=-1)

    block = model.blocks[1]
    _, c = adapter.run_with_cache(
        ids, ["blocks.1.attn_out"], edits={"blocks.1.head_out": drop_head}
    )
    with torch.no_grad():
        heads = drop_head(clean["blocks.1.head_out"]).flatten(-2)
        torch.testing.assert_close(c["blocks.1.attn_out"], block.attn.o_proj(heads))
    edits = {"blocks.1.mlp_hidden": halve_neurons}
    _, c = adapter.run_with_cache(ids, ["blocks.1.mlp_out"], edits=edits)
    with torch.no_grad():
        hidden = halve_neurons(clean["blocks.1.mlp_hidden"])
        torch.testing.assert_close(c["blocks.1.mlp_out"], block.mlp.down(hidden))


def test_an_edited_pattern_is_the_one_attention_uses():
    model = build()
    adapter = nnobs_adapter(model)
    ids = tokens()
    # Every token attends only to itself: each head's output is then its own value vector.
    eye = lambda p: torch.eye(p.shape[-1]).expand_as(p)  # noqa: E731
    _, c = adapter.run_with_cache(
        ids, ["blocks.0.resid_pre", "blocks.0.head_out"], edits={"blocks.0.attn_pattern": eye}
    )
    block = model.blocks[0]
    with torch.no_grad():
        values = block.attn.v_proj(block.norm1(c["blocks.0.resid_pre"])).unflatten(-1, (4, 8))
    torch.testing.assert_close(c["blocks.0.head_out"], values)


def test_edits_compose_in_order_and_the_capture_sees_the_result():
    adapter = nnobs_adapter(build())
    ids = tokens()
    site = "blocks.1.resid_post"
    _, clean = adapter.run_with_cache(ids, [site])
    edits = {site: [lambda h: h + 1.0, lambda h: h * 2.0]}
    _, c = adapter.run_with_cache(ids, [site], edits=edits)
    torch.testing.assert_close(c[site], (clean[site] + 1.0) * 2.0)
    # The same shift entering block 2 at its input gives the same logits.
    shift = torch.linspace(-1, 1, 32)
    a, _ = adapter.run_with_cache(ids, [], edits={site: lambda h: h + shift})
    b, _ = adapter.run_with_cache(ids, [], edits={"blocks.2.resid_pre": lambda h: h + shift})
    torch.testing.assert_close(a, b)


def test_hooks_are_removed_even_when_an_edit_fails():
    model = build()
    adapter = nnobs_adapter(model)

    def broken(h):
        raise RuntimeError("edit failed")

    with pytest.raises(RuntimeError, match="edit failed"):
        adapter.run_with_cache(tokens(), [], edits={"embed": broken})
    assert not any(hp._forward_hooks for hp in model.hook_points().values())


def test_undetached_hooks_let_gradients_reach_an_edit():
    adapter = nnobs_adapter(build())
    delta = torch.zeros(32, requires_grad=True)
    with adapter.hooks(["final"], edits={"blocks.0.mlp_out": lambda h: h + delta}, detach=False):
        logits = adapter.forward(tokens())
    logits[:, -1, 5].sum().backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0


def test_right_padding_never_reaches_real_positions():
    adapter = nnobs_adapter(build())
    real = tokens(1, 6)
    padded = torch.cat([real, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    site = "blocks.2.resid_post"
    a, ca = adapter.run_with_cache(real, [site])
    b, cb = adapter.run_with_cache(padded, [site])
    torch.testing.assert_close(b[:, :6], a)
    torch.testing.assert_close(cb[site][:, :6], ca[site])


def test_sites_are_named_and_resolved_with_clear_errors():
    adapter = nnobs_adapter(build())
    assert adapter.site_name(-1, "mlp_out") == "blocks.2.mlp_out"
    with pytest.raises(NnobsError, match="unknown site kind"):
        adapter.site_name(0, "residual")
    with pytest.raises(NnobsError, match="unknown hook site"):
        adapter.resolve("final_norm")
    with pytest.raises(NnobsError, match="out of range"):
        adapter.run_with_cache(tokens(), ["blocks.3.resid_post"])
