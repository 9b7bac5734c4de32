"""Wrapping a vanilla model as a routed one: same outputs, content-independent schedule weights."""

import pytest
import torch
import transformers

from nnobs.core.errors import NnobsError
from nnobs.models.adapter import nnobs_adapter
from nnobs.models.config import ModelConfig
from nnobs.models.hf import hf_adapter
from nnobs.models.transformer import Transformer
from nnobs.routing.edits import mask_sources
from nnobs.routing.wrap import recency_weights, routing_blocks, wrap_routed

VANILLA = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, d_mlp=48, max_seq_len=16)
IDS = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(0))
ROUTES = [f"blocks.{layer}.route_{s}" for layer in range(4) for s in ("attn", "mlp")]
HF_CONFIGS = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
}


def hf_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = HF_CONFIGS[family](
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, vocab_size=64, max_position_embeddings=64, head_dim=8,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # default init leaves sublayers near-silent; make the check sensitive
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="module", params=["nnobs", *HF_CONFIGS])
def vanilla(request):
    if request.param == "nnobs":
        model = Transformer(VANILLA, generator=torch.Generator().manual_seed(1)).eval()
        return nnobs_adapter(model)
    return hf_adapter(hf_model(request.param))


@pytest.mark.parametrize("blocks", [1, 2, 4])
def test_the_wrap_reproduces_the_logits_with_analytic_weights(vanilla, blocks):
    with torch.no_grad():
        plain = vanilla.forward(IDS)
    with wrap_routed(vanilla, blocks, recency=2.0) as routed:
        assert routing_blocks(routed) == blocks
        logits, cache = routed.run_with_cache(IDS, ROUTES)
    assert (logits - plain).abs().max() <= 1e-4
    for site, weights in cache.items():
        assert weights.std(dim=(0, 1)).max() == 0, site  # content-independent
        expected = recency_weights(weights.shape[-1], 2.0).float()
        assert torch.allclose(weights[0, 0], expected, atol=1e-7), site
    assert cache["blocks.3.route_mlp"].shape[-1] == {1: 2, 2: 3, 4: 5}[blocks]
    # Leaving the block unwraps: no route sites, the same logits as before.
    with pytest.raises(NnobsError, match="needs a routed residual"):
        vanilla.resolve("blocks.0.route_attn")
    with torch.no_grad():
        assert torch.equal(vanilla.forward(IDS), plain)


def test_schedule_weights_are_the_stated_formula():
    weights = recency_weights(4, 1.5)
    e = torch.tensor(1.5, dtype=torch.float64).exp()
    assert torch.allclose(weights, torch.tensor([1, 1, 1, e]) / (e + 3))


def test_masking_under_the_wrap_removes_the_source_from_the_sum():
    model = Transformer(VANILLA, generator=torch.Generator().manual_seed(1)).eval()
    adapter = nnobs_adapter(model)
    seen = {}
    outs = [f"blocks.{layer}.{s}_out" for layer in range(2) for s in ("attn", "mlp")]
    with wrap_routed(adapter, 2) as routed:  # the wrap's hook runs first: see what it hands on
        norm = model.blocks[2].norm1
        handle = norm.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
        _, cache = routed.run_with_cache(
            IDS, ["embed", *outs], edits={"blocks.2.route_attn": mask_sources([0], 2)}
        )
    handle.remove()
    # Sources of layer 2's attention: embed and block 0; masking the embedding leaves block 0,
    # renormalised: block 0's sum divided by its schedule weight.
    block0 = sum(cache[o] for o in outs)
    assert torch.allclose(seen["x"], block0 / recency_weights(2)[1].float(), atol=1e-5)


def test_refusals():
    post = nnobs_adapter(Transformer(VANILLA.replace(norm_placement="post")))
    with (
        pytest.raises(NnobsError, match="pre-norm model with a plain residual"),
        wrap_routed(post, 2),
    ):
        pass
    plain = nnobs_adapter(Transformer(VANILLA))
    for blocks, message in ((3, "do not divide the model's 4 layers"), (0, "positive integer")):
        with pytest.raises(NnobsError, match=message), wrap_routed(plain, blocks):
            pass
    with pytest.raises(NnobsError, match="has no routing \\(its residual is 'add'\\)"):
        routing_blocks(plain)
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    )
    gpt2 = hf_adapter(gpt2.eval())
    with pytest.raises(NnobsError, match="Llama/Qwen-style decoder layers"), wrap_routed(gpt2, 2):
        pass
