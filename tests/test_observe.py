"""`nnobs observe` end to end on a tiny trained run, and its bad-input errors."""

import json

import numpy as np
import pytest
import torch

from nnobs.cli import main
from nnobs.core.errors import NnobsError
from nnobs.core.results import load_result, validate
from nnobs.data.corpus import load_corpus
from nnobs.data.tokenizer import byte_tokenizer
from nnobs.models.adapter import nnobs_adapter
from nnobs.models.config import ModelConfig
from nnobs.models.load import load_model
from nnobs.models.transformer import Transformer
from nnobs.observe.protocol import observe, observe_model
from nnobs.observe.settings import ObserveSettings
from nnobs.report.summary import observe_summary

# Small enough to run in seconds: 2 layers x 64 wide, 40 tokens per dimension.
FAST = ["--ex-per-dim", "40", "--seeds", "43-45", "--n-boot", "100", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("NNOBS_CACHE", str(cache))
    out = tmp_path_factory.mktemp("run") / "tiny"
    argv = ["train", "--preset", "tiny", "--no-progress", "--out", str(out),
            "--set", "train.steps=60", "--set", "train.max_chars=120000"]  # fmt: skip
    assert main(argv) == 0
    yield out
    mp.undo()


def fails(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: " in err and message in err and "Traceback" not in err, err


def test_observe_a_trained_run_end_to_end(tiny_run, tmp_path, capsys):
    out = tmp_path / "obs"
    argv = ["observe", "--model", str(tiny_run), "--out", str(out), "--domain2", "none", *FAST]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "layer sweep" in printed and "verdict: the signal" in printed
    doc = load_result(out / "observe.json")  # validates against the schema
    assert (out / "layer_profile.png").stat().st_size > 5000
    # The model was trained on stdlib: the probe never sees its training documents.
    assert doc["split_policy"].startswith("model trained on this corpus")
    assert doc["tokens"]["train"]["tokens"] == 40 * 64
    assert [r["layer"] for r in doc["sweep"]] == [0, 1]
    assert doc["candidates"] == [0, 1] or doc["candidates"] == [1, 0]  # l <= int(0.8 * 2)
    assert doc["headline"]["seeds"] == [43, 44, 45] and len(doc["headline"]["per_seed"]) == 3
    head = doc["headline"]
    lo, hi = head["ensemble_ci95"]
    assert lo <= head["ensemble"] <= hi
    assert "training documents" in head["interval"] and head["ensemble_sd"] > 0
    assert set(head["by_label"]) == {"rank", "reference"} and head["label"] == "reference"
    assert head["by_label"]["reference"] == head["ensemble"]
    assert set(doc["controls"]["pcorr"]) == {
        "none", "softmax_only", "norm_only", "standard", "plus_entropy", "nonlinear"
    }  # fmt: skip
    assert [f["rate"] for f in doc["flagging"]] == [0.05, 0.1, 0.2, 0.3]
    null = doc["null"]
    assert null["n_null"] == 1 and [m["init_seed"] for m in null["models"]] == [0]
    assert (null["layer"], null["split"]) == (doc["layer"], "test")
    assert null["floor"] > null["null_mean"] and 0 <= null["p_value"] <= 1
    assert (
        doc["verdict"]["signal"] == (null["p_value"] < 0.05) == (head["ensemble"] > null["floor"])
    )
    assert doc["baselines"]["norm"]["pcorr"] is None  # controlled away
    assert len(doc["label"]["rank"]) == len(doc["label"]["reference"]) == 10
    assert doc["provenance"]["step"] == 60 and doc["provenance"]["config_hash"]
    assert len(doc["probe"]["direction"]) == 64
    assert np.isclose(np.linalg.norm(doc["probe"]["direction"]), 1.0)
    assert doc["cross_domain"] is None


def test_cross_domain_and_python_api(tiny_run):
    settings = ObserveSettings(ex_per_dim=30, seeds=[43, 44], n_boot=50, null_models=0)
    domain2 = load_corpus("stdlib-tests", max_chars=200_000)
    doc = observe_model(str(tiny_run), "stdlib", domain2=domain2, settings=settings, progress=False)
    validate(doc)
    cross = doc["cross_domain"]
    assert cross["domain_b"] == "stdlib-tests"
    # A→A is the headline's statistic: the same seed probes' ensemble on the same test tokens.
    assert cross["site"] == doc["headline"]["site"]
    assert cross["a_to_a"] == doc["headline"]["ensemble"]
    # Domain B's splits take the same token budget, and the trained model's signal is there
    # both for the transferred probes and for probes trained on B.
    assert cross["tokens"] == {"train": 30 * 64, "test": 30 * 64}
    assert cross["a_to_b"] > 0 and cross["b_to_b"] > 0
    assert doc["null"] is None and doc["verdict"]["signal"] is None
    assert "test pcorr at layer" in observe_summary(doc)


def test_a_result_written_is_valid_json_and_nothing_is_left_on_failure(tiny_run, tmp_path, capsys):
    out = tmp_path / "obs"
    fails(capsys, ["observe", "--model", str(tiny_run), "--out", str(out), "--layers", "5"],
          "layer 5 is out of range")  # fmt: skip
    assert not (out / "observe.json").exists()


def test_bad_inputs(tiny_run, tmp_path, capsys):
    fails(capsys, ["observe", "--model", str(tmp_path / "nowhere")], "no such model")
    fails(capsys, ["observe", "--model", str(tiny_run), "--ex-per-dim", "100000",
                   "--no-progress"], "corpus too small")  # fmt: skip
    fails(capsys, ["observe", "--model", str(tiny_run), "--seeds", "x"], "expected integers")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(capsys, ["observe", "--model", str(tiny_run), "--corpus", str(empty)], "no text files")


def test_non_finite_activations_are_refused(tiny_run):
    adapter = load_model(tiny_run)
    with torch.no_grad():
        adapter.model.blocks[1].mlp.down.weight.fill_(float("nan"))
    settings = ObserveSettings(ex_per_dim=10, seeds=[43, 44], n_boot=10, null_models=0)
    with pytest.raises(NnobsError, match="non-finite"):
        observe(
            adapter,
            load_corpus("stdlib-tests", max_chars=100_000),
            settings=settings,
            progress=False,
        )


def test_a_model_without_tokenizer_is_refused():
    cfg = ModelConfig(vocab_size=257, d_model=16, n_layers=2, n_heads=2, max_seq_len=32)
    adapter = nnobs_adapter(Transformer(cfg))
    with pytest.raises(NnobsError, match="no tokenizer"):
        observe(adapter, load_corpus("stdlib", max_chars=50_000), progress=False)
    adapter.tokenizer = byte_tokenizer()
    settings = ObserveSettings(ex_per_dim=5, seeds=[43, 44], n_boot=10, null_models=0)
    doc = observe(
        adapter, load_corpus("stdlib", max_chars=50_000), settings=settings, progress=False
    )
    # Plain data: JSON without a fallback for numpy or torch values, and back to an equal result.
    plain = json.loads(json.dumps(doc))
    assert plain == doc and plain["schema"] == "nnobs.observe"
    assert plain["headline"]["layer"] == plain["layer"] and plain["layer"] in plain["candidates"]
    assert plain["tokens"]["train"]["tokens"] == 5 * 16  # ex_per_dim × d_model
