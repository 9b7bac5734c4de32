"""Hugging Face adapter on tiny random-weight models of eight families (no downloads)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from nnobs.core.errors import NnobsError  # noqa: E402
from nnobs.models.hf import hf_adapter, load_hf_model  # noqa: E402

D, LAYERS, HEADS, D_MLP, VOCAB = 32, 3, 4, 64, 96
COMMON = dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, vocab_size=VOCAB)
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        n_embd=D,
        n_layer=LAYERS,
        n_head=HEADS,
        n_inner=D_MLP,
        vocab_size=VOCAB,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        intermediate_size=D_MLP, max_position_embeddings=64, **COMMON
    ),
    "llama": lambda: transformers.LlamaConfig(
        num_key_value_heads=2, intermediate_size=D_MLP, **COMMON
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        num_key_value_heads=2, intermediate_size=D_MLP, **COMMON
    ),
    "mistral": lambda: transformers.MistralConfig(
        num_key_value_heads=2, intermediate_size=D_MLP, **COMMON
    ),
    "gemma": lambda: transformers.GemmaConfig(
        num_key_value_heads=2, intermediate_size=D_MLP, head_dim=D // HEADS, **COMMON
    ),
    "phi": lambda: transformers.PhiConfig(intermediate_size=D_MLP, **COMMON),
    "opt": lambda: transformers.OPTConfig(
        ffn_dim=D_MLP, word_embed_proj_dim=D, max_position_embeddings=64, **COMMON
    ),
}
PARALLEL = {"gpt_neox", "phi"}  # attention and MLP read the same input: no resid_mid
KINDS = ("resid_pre", "attn_out", "resid_mid", "mlp_hidden", "mlp_out", "resid_post", "head_out")


def build(family: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family](), **kwargs)
    # Default init gives near-silent sublayers; larger weights make every check sensitive.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def family(request):
    model = build(request.param)
    return request.param, model, hf_adapter(model)


@pytest.fixture(scope="module")
def clean(family):
    """Logits and every site of one clean forward pass over ``ids()``."""
    _, _, adapter = family
    return adapter.run_with_cache(ids(), list(adapter.sites))


def ids(batch: int = 2, pos: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


def test_every_documented_site_resolves_with_its_shape(family, clean):
    name, model, adapter = family
    assert adapter.n_layers == LAYERS and adapter.d_model == D and adapter.vocab_size == VOCAB
    expected = {k for k in KINDS if not (k == "resid_mid" and name in PARALLEL)}
    for layer in range(LAYERS):
        present = {s.split(".")[-1] for s in adapter.sites if s.startswith(f"blocks.{layer}.")}
        assert present == expected, name
    assert {"embed", "final"} <= set(adapter.sites)
    for site, value in clean[1].items():
        kind = site.split(".")[-1]
        want = {
            "mlp_hidden": (2, 6, D_MLP),
            "head_out": (2, 6, HEADS, D // HEADS),
        }.get(kind, (2, 6, D))
        assert tuple(value.shape) == want, site


def test_capturing_everything_leaves_logits_unchanged(family, clean):
    _, model, adapter = family
    logits, cache = clean
    assert len(cache) == len(adapter.sites)
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, logits)


def test_the_stream_adds_up(family, clean):
    name, model, adapter = family
    c = clean[1]
    assert torch.equal(c["embed"], c["blocks.0.resid_pre"])
    for layer in range(LAYERS):
        p = f"blocks.{layer}."
        if layer + 1 < LAYERS:
            assert torch.equal(c[p + "resid_post"], c[f"blocks.{layer + 1}.resid_pre"])
        if name in PARALLEL:
            total = c[p + "resid_pre"] + c[p + "attn_out"] + c[p + "mlp_out"]
            torch.testing.assert_close(c[p + "resid_post"], total)
        else:
            torch.testing.assert_close(c[p + "resid_mid"], c[p + "resid_pre"] + c[p + "attn_out"])
            torch.testing.assert_close(c[p + "resid_post"], c[p + "resid_mid"] + c[p + "mlp_out"])


def test_final_is_what_the_lm_head_reads(family, clean):
    _, model, adapter = family
    logits, c = clean
    torch.testing.assert_close(model.get_output_embeddings()(c["final"]), logits)
    torch.testing.assert_close(adapter.unembed_fn(c[f"blocks.{LAYERS - 1}.resid_post"]), logits)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_unembed_is_offered_only_where_logits_are_the_heads_output(softcap):
    torch.manual_seed(0)
    config = transformers.Gemma2Config(
        num_key_value_heads=2,
        intermediate_size=D_MLP,
        head_dim=D // HEADS,
        final_logit_softcapping=softcap,
        **COMMON,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    adapter = hf_adapter(model)
    if softcap is None:
        logits, c = adapter.run_with_cache(ids(), [f"blocks.{LAYERS - 1}.resid_post"])
        torch.testing.assert_close(adapter.unembed_fn(c[f"blocks.{LAYERS - 1}.resid_post"]), logits)
    else:  # tanh capping after the head: the stream → logits map is not the head alone
        assert adapter.unembed_fn is None


def test_zeroing_mlp_out_equals_the_manual_computation(family, clean):
    name, model, adapter = family
    x = ids()
    last = f"blocks.{LAYERS - 1}."
    clean_logits, cache = clean
    zero = {last + "mlp_out": torch.zeros_like}
    logits, edited = adapter.run_with_cache(x, [last + "resid_post"], edits=zero)
    assert (logits - clean_logits).abs().max() > 1e-3
    # Without the MLP's contribution the block's output is what came before the MLP.
    before_mlp = (
        cache[last + "resid_pre"] + cache[last + "attn_out"]
        if name in PARALLEL
        else cache[last + "resid_mid"]
    )
    torch.testing.assert_close(edited[last + "resid_post"], before_mlp)
    torch.testing.assert_close(logits, adapter.unembed_fn(before_mlp))
    # An early edit changes everything downstream.
    early, _ = adapter.run_with_cache(x, [], edits={"blocks.0.mlp_out": torch.zeros_like})
    assert (early - clean_logits).abs().max() > 1e-3


def test_adding_to_the_last_residual_shifts_the_logits_exactly(family, clean):
    _, model, adapter = family
    site = f"blocks.{LAYERS - 1}.resid_post"
    v = torch.linspace(-1, 1, D)
    logits, _ = adapter.run_with_cache(ids(), [], edits={site: lambda h: h + v})
    torch.testing.assert_close(logits, adapter.unembed_fn(clean[1][site] + v))


def test_zeroed_heads_and_neurons_leave_only_the_projection_bias(family):
    _, model, adapter = family
    x = ids()
    sites = ["blocks.1.attn_out", "blocks.1.mlp_out"]
    edits = {"blocks.1.head_out": torch.zeros_like, "blocks.1.mlp_hidden": torch.zeros_like}
    _, c = adapter.run_with_cache(x, sites, edits=edits)
    o_proj = adapter.resolve("blocks.1.head_out").module
    down = adapter.resolve("blocks.1.mlp_hidden").module
    with torch.no_grad():
        torch.testing.assert_close(c["blocks.1.attn_out"], o_proj(torch.zeros(2, 6, D)))
        torch.testing.assert_close(c["blocks.1.mlp_out"], down(torch.zeros(2, 6, D_MLP)))


def test_one_head_edit_changes_only_that_heads_share(family, clean):
    _, model, adapter = family
    x = ids()

    def drop_head_2(h):
        h = h.clone()
        h[:, :, 2] = 0
        return h

    _, c = adapter.run_with_cache(
        x, ["blocks.0.attn_out"], edits={"blocks.0.head_out": drop_head_2}
    )
    o_proj = adapter.resolve("blocks.0.head_out").module
    heads = drop_head_2(clean[1]["blocks.0.head_out"])
    with torch.no_grad():
        torch.testing.assert_close(c["blocks.0.attn_out"], o_proj(heads.flatten(-2)))


def test_padding_on_the_right_leaves_real_positions_alone(family):
    _, model, adapter = family
    x = ids(1, 4)
    padded = torch.cat([x, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    torch.testing.assert_close(adapter.forward(padded, mask)[:, :4], adapter.forward(x))


def test_parallel_families_explain_the_missing_resid_mid():
    adapter = hf_adapter(build("gpt_neox"))
    with pytest.raises(NnobsError, match="not available in this architecture.*parallel"):
        adapter.resolve("blocks.1.resid_mid")
    with pytest.raises(NnobsError, match="out of range"):
        adapter.resolve(f"blocks.{LAYERS}.resid_mid")
    sequential = transformers.GPTNeoXConfig(
        intermediate_size=D_MLP, max_position_embeddings=64, use_parallel_residual=False, **COMMON
    )
    assert (
        "blocks.1.resid_mid"
        in hf_adapter(transformers.AutoModelForCausalLM.from_config(sequential)).sites
    )


@pytest.mark.parametrize("family_name", ["llama", "gpt2"])
def test_eager_attention_exposes_read_only_patterns(family_name):
    adapter = hf_adapter(build(family_name, attn_implementation="eager"))
    x = ids(2, 5)
    _, c = adapter.run_with_cache(x, ["blocks.0.attn_pattern"])
    pattern = c["blocks.0.attn_pattern"]
    assert pattern.shape == (2, HEADS, 5, 5)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, HEADS, 5))
    assert pattern.triu(1).abs().max() == 0  # causal: no weight on future tokens
    with pytest.raises(NnobsError, match="read but not edited"):
        adapter.run_with_cache(x, [], edits={"blocks.0.attn_pattern": torch.zeros_like})
    # the failed attach left no hook behind
    assert torch.equal(adapter.forward(x), adapter.model(x).logits)


def test_sdpa_attention_says_how_to_get_patterns():
    adapter = hf_adapter(build("llama", attn_implementation="sdpa"))
    with pytest.raises(NnobsError, match="attn_implementation='eager'"):
        adapter.resolve("blocks.0.attn_pattern")


def test_post_norm_opt_maps_resid_mid_after_the_norm():
    config = CONFIGS["opt"]()
    config.do_layer_norm_before = False
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    adapter = hf_adapter(model)
    assert "final" not in adapter.sites  # post-norm OPT has no final norm
    x = ids()
    _, c = adapter.run_with_cache(x, list(adapter.sites))
    layer = model.model.decoder.layers[1]
    torch.testing.assert_close(
        c["blocks.1.resid_mid"],
        layer.self_attn_layer_norm(c["blocks.1.resid_pre"] + c["blocks.1.attn_out"]),
    )
    torch.testing.assert_close(
        c["blocks.1.resid_post"],
        layer.final_layer_norm(c["blocks.1.resid_mid"] + c["blocks.1.mlp_out"]),
    )


def test_provenance_names_the_model():
    adapter = hf_adapter(build("qwen2"), provenance={"source": "tiny"})
    prov = adapter.provenance
    assert prov["kind"] == "hf" and prov["architecture"] == "Qwen2ForCausalLM"
    assert prov["source"] == "tiny" and prov["dtype"] == "float32"
    assert len(prov["config_hash"]) == 12
    other = hf_adapter(build("qwen2"))
    assert other.provenance["config_hash"] == prov["config_hash"]
    assert hf_adapter(build("llama")).provenance["config_hash"] != prov["config_hash"]


def test_hf_adapter_rejects_other_modules():
    with pytest.raises(NnobsError, match="PreTrainedModel"):
        hf_adapter(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------- loading


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(VOCAB - 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>"
    )


def test_load_hf_model_from_a_saved_directory(tmp_path):
    model = build("llama")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    adapter = load_hf_model(tmp_path)
    assert adapter.tokenizer is None  # a directory without tokenizer files
    assert type(adapter).__name__ == "HFAdapter"
    x = ids()
    torch.testing.assert_close(adapter.forward(x), model(x).logits)
    assert adapter.provenance["source"] == str(tmp_path)
    assert adapter.provenance["config_hash"] == hf_adapter(model).provenance["config_hash"]
    assert adapter.provenance["context_length"] == model.config.max_position_embeddings

    tiny_tokenizer().save_pretrained(tmp_path)
    with_tok = load_hf_model(str(tmp_path), dtype="bfloat16")
    assert with_tok.tokenizer.encode("w3 w7") == [5, 9]
    assert with_tok.tokenizer.eos_id == 0
    assert with_tok.provenance["dtype"] == "bfloat16"


def test_load_hf_model_through_load_model(tmp_path):
    from nnobs.models.load import load_model

    build("gpt2").save_pretrained(tmp_path)
    adapter = load_model(tmp_path)
    assert adapter.provenance["architecture"] == "GPT2LMHeadModel"


def test_missing_paths_fail_in_one_line(tmp_path):
    with pytest.raises(NnobsError, match="no such model directory"):
        load_hf_model(str(tmp_path / "nope" / "deeper"))
    with pytest.raises(NnobsError, match="no config.json"):
        load_hf_model(tmp_path)


def test_unknown_hub_name_offline_says_there_is_no_network(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(NnobsError, match="no network") as info:
        load_hf_model("nnobs-test/does-not-exist")
    assert "\n" not in str(info.value)


def test_encoders_are_not_causal_lms(tmp_path):
    transformers.BertConfig(
        hidden_size=D, num_hidden_layers=1, num_attention_heads=HEADS, intermediate_size=D_MLP
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(NnobsError, match="not a causal language model .*BertConfig"):
        load_hf_model(tmp_path / "bert")
    transformers.T5Config(d_model=D, num_layers=1, num_heads=HEADS).save_pretrained(tmp_path / "t5")
    with pytest.raises(NnobsError, match="not a causal language model .*encoder-decoder"):
        load_hf_model(tmp_path / "t5")


def test_auto_device_needs_accelerate(tmp_path):
    try:
        import accelerate  # noqa: F401
    except ImportError:
        build("llama").save_pretrained(tmp_path)
        with pytest.raises(NnobsError, match="accelerate"):
            load_hf_model(tmp_path, device="auto")
    else:
        pytest.skip("accelerate is installed")


def test_a_directory_without_tokenizer_files_has_no_tokenizer(tmp_path):
    build("gpt2").save_pretrained(tmp_path)  # GPT-2's tokenizer class loads, empty, without files
    assert load_hf_model(tmp_path).tokenizer is None


def test_pickled_weights_are_never_unpickled(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    build("gpt2").save_pretrained(tmp_path)
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(NnobsError, match="nnobs loads safetensors only") as err:
        load_hf_model(tmp_path)
    assert "safe_serialization=True" in str(err.value) and "weights_only" not in str(err.value)
