"""``nnobs routing`` end to end: a trained routed run and a wrapped vanilla run side by side,
and every bad input refused in one line with nothing written."""

import json

import pytest
from conftest import TINY_MODEL, tiny_train_config

from nnobs.cli import main
from nnobs.core.results import load_result


@pytest.fixture(scope="module")
def routed_run(python_corpus, nnobs_cache, tmp_path_factory):
    from nnobs.training.trainer import train

    out = tmp_path_factory.mktemp("routed") / "attnres"
    model = TINY_MODEL.replace(residual="attnres")
    train(model, tiny_train_config(python_corpus), out, progress=False)
    return out


@pytest.mark.slow
def test_a_routed_and_a_wrapped_run_side_by_side(routed_run, python_run, python_corpus, tmp_path):
    out = tmp_path / "out"
    argv = ["routing", "--model", routed_run, "--model", python_run, "--wrap-blocks", "2",
            "--corpus", python_corpus, "--windows", "8", "--window-len", "32", "--n-boot", "50",
            "--out", out, "--no-progress"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    doc = load_result(out / "routing.json", "nnobs.routing")
    routed, wrapped = doc["models"]
    assert routed["routing"] == {"kind": "attnres", "blocks": 2} and "wrap_check" not in routed
    assert routed["max_weight_std"] > 1e-4  # trained routing depends on content
    assert wrapped["routing"]["kind"] == "wrapped" and wrapped["max_weight_std"] <= 1e-6
    assert wrapped["wrap_check"]["max_logit_diff"] <= 1e-4
    page = (out / "report" / "index.html").read_text()
    assert page.count("<h3>") == 2 and "routing_mass_effect" in page
    assert json.loads((out / "routing.json").read_text())["settings"]["wrap_blocks"] == 2


CASES = [
    (["--wrap-blocks", "0"], "must be a positive integer, got 0"),
    (["--wrap-blocks", "3"], "do not divide the model's 2 layers"),
    ([], "has no routing (its residual is 'add')"),
    (["--windows", "0"], "--windows must be at least 1"),
    (["--n-boot", "1"], "--n-boot must be at least 2"),
    (["--recency", "nan"], "--recency must be a finite number"),
    (["--wrap-blocks", "2", "--bands", "3"], "depth bands must be in 1..2"),
]


@pytest.mark.parametrize(("extra", "message"), CASES)
def test_bad_input_is_refused(expect_refusal, python_run, python_corpus, tmp_path, extra, message):
    model = python_run
    argv = ["routing", "--model", model, "--corpus", python_corpus, "--windows", "4",
            "--out", tmp_path / "out", "--no-progress", *extra]  # fmt: skip
    expect_refusal(argv, message, watch=[tmp_path, model])


def test_a_route_site_of_an_additive_model_is_refused_naming_its_residual(
    expect_refusal, python_run, python_corpus, tmp_path
):
    argv = ["ablate", "--model", python_run, "--site", "blocks.0.route_mlp", "--corpus",
            python_corpus, "--windows", "2", "--out", tmp_path / "out"]  # fmt: skip
    expect_refusal(argv, "needs a routed residual, and this model's residual is 'add'", [tmp_path])


@pytest.mark.slow
def test_a_hugging_face_qwen3_is_analysed_under_the_wrap(python_corpus, nnobs_cache, tmp_path):
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, vocab_size=64, max_position_embeddings=64, head_dim=8,
    )  # fmt: skip
    model_dir = tmp_path / "qwen3"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    words = {"<eos>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(["def", "return", "("])}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>"
    ).save_pretrained(model_dir)
    out = tmp_path / "out"
    argv = ["routing", "--model", model_dir, "--wrap-blocks", "2", "--corpus", python_corpus,
            "--windows", "6", "--window-len", "16", "--n-boot", "50", "--out", out,
            "--no-progress"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    (entry,) = load_result(out / "routing.json", "nnobs.routing")["models"]
    assert entry["routing"] == {"kind": "wrapped", "blocks": 2, "recency": 2.0}
    assert entry["wrap_check"]["max_logit_diff"] <= 1e-4 and entry["max_weight_std"] <= 1e-6
    assert entry["provenance"]["architecture"] == "Qwen3ForCausalLM"
