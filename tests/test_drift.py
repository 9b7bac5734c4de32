"""Feature drift: matching neurons and SAE features, transfer, CKA, and the drift command."""

import copy
import shutil
import subprocess
from dataclasses import replace

import numpy as np
import pytest
import test_finetune
import torch

from nnobs.cli import main
from nnobs.core.errors import NnobsError
from nnobs.core.results import load_result
from nnobs.data.windows import make_windows
from nnobs.features import drift
from nnobs.features.sae import SparseAutoencoder
from nnobs.models.adapter import nnobs_adapter
from nnobs.models.load import load_model

# The fine-tuned run and its corpus, built once per session by test_finetune's fixtures.
finetuned_run = test_finetune.finetuned_run
stdlib_test_files = test_finetune.stdlib_test_files

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread, nnobs_cache):
    pass


def _sae(d_in=32, d_sae=64, seed=0):
    torch.manual_seed(seed)
    sae = SparseAutoencoder(d_in, d_sae, 4, site="blocks.0.resid_post")
    sae.W_dec.data.normal_()
    return sae


def test_decoder_matching_finds_a_permuted_copy_and_not_a_stranger():
    base = _sae()
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    shuffled = copy.deepcopy(base)
    shuffled.W_dec.data = base.W_dec.data[perm]
    same = drift.decoder_matching(base, shuffled)
    assert same["fraction_matched"] == 1.0 and not same["vanished"] and not same["appeared"]
    assert same["match"] == torch.argsort(perm).tolist()  # base i sits at perm⁻¹(i)
    stranger = drift.decoder_matching(base, _sae(seed=2))
    assert stranger["fraction_matched"] < 0.1  # random 32-d directions are far apart
    assert len(stranger["vanished"]) > 57 and len(stranger["appeared"]) > 57
    assert sum(stranger["histogram"]["counts"]) == 64


def _learned(truth: torch.Tensor, order: torch.Tensor, seed: int) -> SparseAutoencoder:
    """An SAE whose decoder is the true dictionary in another order, each direction learned
    with an error (cosine about 0.9 to the truth), as an SAE from another seed would be."""
    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(truth.shape[1], truth.shape[0], 4, site="blocks.0.resid_post")
    noise = torch.randn(truth.shape, generator=g) / truth.shape[1] ** 0.5
    sae.W_dec.data = torch.nn.functional.normalize(truth + 0.5 * noise, dim=1)[order]
    return sae


def _truth(n=256, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def _order(n, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def test_an_unchanged_dictionary_calls_features_vanished_at_about_the_null_rate():
    truth = _truth()
    base, seed2 = _learned(truth, torch.arange(256), 1), _learned(truth, _order(256, 2), 2)
    rates = []
    for rep in range(5):  # fine-tuned SAEs of an unchanged model: other seeds, other orders
        tuned = _learned(truth, _order(256, 10 + rep), 10 + rep)
        m = drift.decoder_matching(base, tuned, null=seed2)
        test = m["vanish_test"]
        assert test["expected_rate"] == 0.05 and test["expected_vanished"] == 0.05 * 256
        rates += [test["vanished_rate"], test["appeared_rate"]]
    assert np.mean(rates) <= 0.08 and max(rates) <= 0.12  # about the 5% the null gives


def test_planted_removed_features_vanish_and_new_ones_appear():
    truth = _truth()
    removed = torch.arange(0, 256, 8)  # 32 features the fine-tuning replaced
    changed = truth.clone()
    changed[removed] = _truth(32, seed=5)
    base, seed2 = _learned(truth, torch.arange(256), 1), _learned(truth, _order(256, 2), 2)
    order = _order(256, 3)
    m = drift.decoder_matching(base, _learned(changed, order, 3), null=seed2)
    found = set(m["vanished"]) & set(removed.tolist())
    assert len(found) >= 30 and len(m["vanished"]) <= 32 + 0.1 * 224
    new_positions = set(torch.argsort(order)[removed].tolist())  # where they sit in the SAE
    assert len(set(m["appeared"]) & new_positions) >= 30
    best = np.asarray(m["best_match"]["base"])
    assert best[m["vanished"][0]] == best[m["vanished"]].min()  # most vanished first
    assert m["vanish_test"]["threshold_vanished"] > 0.6


@pytest.fixture(scope="module")
def tiny(python_run):
    adapter = load_model(python_run)
    docs = [np.asarray(adapter.tokenizer.encode(f"def g{i}(a, b):\n    return a + b * {i}\n" * 3))
            for i in range(30)]  # fmt: skip
    return adapter, make_windows(docs, 32)


def _permuted_neurons(adapter, layer, perm):
    """The same model with the neurons of one MLP reordered: it computes exactly the same."""
    model = copy.deepcopy(adapter.model)
    mlp = model.blocks[layer].mlp
    mlp.up.weight.data = mlp.up.weight.data[perm]
    if mlp.up.bias is not None:
        mlp.up.bias.data = mlp.up.bias.data[perm]
    mlp.down.weight.data = mlp.down.weight.data[:, perm]
    return nnobs_adapter(model, adapter.tokenizer, adapter.provenance)


def test_neuron_matching_recovers_a_planted_permutation(tiny):
    adapter, windows = tiny
    site = "blocks.0.mlp_hidden"
    width = adapter.model.blocks[0].mlp.up.out_features
    perm = torch.randperm(width, generator=torch.Generator().manual_seed(0))
    moved = _permuted_neurons(adapter, 0, perm)
    result = drift.neuron_drift(drift.activation_correlation(adapter, moved, windows, site))
    expected = torch.argsort(perm).numpy()
    match = np.asarray(result["matching"]["match"])
    assert (match == expected).mean() > 0.95 and result["matching"]["fraction_matched"] > 0.95
    assert result["kept_index"] < 0.1  # the neurons moved, and the matching says so
    itself = drift.neuron_drift(drift.activation_correlation(adapter, adapter, windows, site))
    assert itself["kept_index"] > 0.95 and itself["own_correlation"]["median"] > 0.999


def test_cka_of_a_model_with_itself_is_one_and_with_a_random_model_is_not(tiny):
    from nnobs.models.load import random_init_like

    adapter, windows = tiny
    same = drift.cka_per_layer(adapter, adapter, windows)
    assert [r["cka"] for r in same] == pytest.approx([1.0, 1.0], abs=1e-5)
    other = drift.cka_per_layer(adapter, random_init_like(adapter, seed=3), windows)
    assert max(r["cka"] for r in other) < 0.9


def test_different_tokenizers_are_refused(tiny):
    from nnobs.data.tokenizer import byte_tokenizer

    adapter, _ = tiny

    class Other(type(byte_tokenizer())):
        fingerprint = "another"

    with pytest.raises(NnobsError, match="different tokenizers"):
        drift.check_same_tokenizer(adapter, replace(adapter, tokenizer=Other()))


def _drift_argv(before, after, out, *extra):
    return ["drift", "--before", before, "--after", after, "--tokens", "1024",
            "--n-boot", "50", "--sae-tokens", "4000", "--expansion", "2", "--k", "4",
            "--out", out, *extra]  # fmt: skip


def test_drift_command_writes_a_valid_result_and_page(python_run, finetuned_run, tmp_path):
    out = tmp_path / "drift"
    argv = _drift_argv(python_run, finetuned_run, out, "--site", "blocks.0.mlp_hidden",
                       "--train-sae", "--no-observe")  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    doc = load_result(out / "drift.json", "nnobs.drift")
    assert doc["neurons"]["n_units"] == 128 and len(doc["cka"]) == 2
    assert 0 < doc["cka"][0]["cka"] < 1  # fine-tuning changed the stream, not beyond recognition
    sae = doc["sae"]
    assert sae["seed_baseline"] is not None and sae["transfer"]["base_sae"]["skip_positions"] == 1
    assert len(sae["matching"]["match"]) == 256
    test = sae["matching"]["vanish_test"]  # against the second base SAE --train-sae trains
    assert test["expected_rate"] == 0.05 and 0 <= test["vanished_rate"] <= 1
    assert len(sae["matching"]["vanished"]) == round(test["vanished_rate"] * 256)
    assert (out / "sae_before" / "cfg.json").is_file()
    page = (out / "index.html").read_text()
    assert "fig-neuron_matching" in page and "fig-sae_matching" in page
    assert "quantile of best matches between two base SAEs" in page
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    dom = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", (out / "index.html").as_uri()],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    assert "CKA per layer" in dom and 'id="fig-sae_matching"' in dom


@pytest.mark.slow
def test_drift_command_measures_the_signal_on_both_models(python_run, finetuned_run, tmp_path):
    out = tmp_path / "drift"
    argv = _drift_argv(python_run, finetuned_run, out, "--site", "blocks.1.mlp_hidden",
                       "--ex-per-dim", "20")  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    decision = load_result(out / "drift.json", "nnobs.drift")["decision"]
    assert decision["before"]["tokens"] == decision["after"]["tokens"]  # the same tokens
    change = decision["change"]
    # the per-token inputs refit after the protocol reproduce both headlines
    for name in ("before", "after"):
        assert change[name] == pytest.approx(decision[name]["pcorr"], abs=1e-9)
    assert decision["difference"] == change["difference"]
    assert change["difference"] == pytest.approx(
        decision["after"]["pcorr"] - decision["before"]["pcorr"]
    )
    lo, hi = change["interval"]
    assert lo < hi and change["sd"] > 0 and change["verdict"] in {"kept", "fell", "rose", "unclear"}
    assert change["changed"] == (change["p_value"] < change["level"])
    assert f"<b>{change['verdict']}</b>" in (out / "index.html").read_text()


@pytest.fixture(scope="module")
def bpe_run(python_corpus, nnobs_cache, tmp_path_factory):
    from conftest import TINY_MODEL, tiny_train_config

    from nnobs.training.trainer import train

    out = tmp_path_factory.mktemp("bpe") / "run"
    config = tiny_train_config(python_corpus, tokenizer="bpe", steps=2, checkpoint_every=2)
    train(replace(TINY_MODEL, vocab_size=300), config, out, progress=False)
    return out


def test_refusals(python_run, finetuned_run, bpe_run, tmp_path, expect_refusal):
    out = tmp_path / "out"
    wide = SparseAutoencoder(16, 32, 4, site="blocks.0.mlp_hidden")
    wide.save(tmp_path / "wide")
    rows = [
        (["--site", "blocks.0.resid_post"], "has no neurons to match"),
        (["--site", "blocks.7.mlp_hidden"], "out of range"),
        (["--site", "blocks.0.mlp_hidden", "--sae-before", tmp_path / "wide"], "give both"),
        (
            [
                "--site",
                "blocks.0.mlp_hidden",
                "--sae-before",
                tmp_path / "wide",
                "--sae-after",
                tmp_path / "wide",
            ],
            "16-wide",
        ),  # fmt: skip
    ]
    rows += [
        (["--site", "blocks.0.mlp_hidden", "--level", "0.7"], "level must be in"),
        (["--site", "blocks.0.mlp_hidden", "--kept-margin", "-0.1"], "kept margin must be"),
    ]
    for extra, message in rows:
        argv = _drift_argv(python_run, finetuned_run, out, *extra, "--no-observe")
        expect_refusal(argv, message, watch=[out])
    argv = _drift_argv(python_run, bpe_run, out, "--site", "blocks.0.mlp_hidden", "--no-observe")
    expect_refusal(argv, "different tokenizers", watch=[out])
