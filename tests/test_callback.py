"""Live observability: the nnobs trainer's callback (results, budget, no effect on training)
and the Hugging Face Trainer callback on a tiny GPT-2 built from a config."""

import json

import pytest
import safetensors.torch
import torch
from conftest import TINY_MODEL, tiny_train_config

from nnobs.core.results import load_result
from nnobs.data.corpus import load_corpus
from nnobs.observe.live import LiveObserver, ObservabilityCallback
from nnobs.observe.trajectory import TrajectorySettings
from nnobs.training.trainer import train

TINY = TrajectorySettings(ex_per_dim=10, doc_tokens=64, seeds=[43, 44], n_boot=50, random_heads=20)


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread, nnobs_cache):
    pass


def weights(run_dir, step):
    return safetensors.torch.load_file(
        str(run_dir / "checkpoints" / f"step_{step:06d}" / "model.safetensors")
    )


def test_live_trajectory_of_an_nnobs_run_leaves_training_untouched(python_corpus, tmp_path):
    plain, observed = tmp_path / "plain", tmp_path / "observed"
    config = tiny_train_config(python_corpus)
    train(TINY_MODEL, config, plain, progress=False)
    callback = ObservabilityCallback(observed, settings=TINY, budget=100.0)
    train(TINY_MODEL, config, observed, progress=False, on_checkpoint=callback)

    # Measuring between steps changes nothing about what is trained.
    for step in (8, 24):
        a, b = weights(plain, step), weights(observed, step)
        assert all(torch.equal(a[k], b[k]) for k in a)
    doc = load_result(observed / "trajectory" / "trajectory.json")
    assert doc["mode"] == "live"
    assert [r["step"] for r in doc["checkpoints"]] == [0, 8, 16, 24]
    assert all(r["status"] == "observed" for r in doc["checkpoints"])
    assert doc["floor"]["source"] == "step 0 checkpoint"
    assert doc["collapse"] is not None and doc["cka"]["reference_step"] == 24
    assert doc["budget"]["skipped"] == [] and doc["budget"]["observe_seconds"] > 0
    assert doc["run"]["n_params"] > 0 and doc["loss_curve"][-1]["step"] == 24
    assert callback.live is None  # closed after the last step


def test_the_budget_skips_middle_checkpoints_but_never_the_first_or_last(python_corpus, tmp_path):
    out = tmp_path / "run"
    callback = ObservabilityCallback(out, settings=TINY, budget=0.001)
    train(TINY_MODEL, tiny_train_config(python_corpus), out, progress=False, on_checkpoint=callback)
    doc = load_result(out / "trajectory" / "trajectory.json")
    status = {r["step"]: r["status"] for r in doc["checkpoints"]}
    assert status[0] == "observed" and status[24] in ("observed", "shrunk")
    assert status[8] == status[16] == "skipped"
    assert doc["budget"]["skipped"] == [8, 16]
    assert "budget" in doc["checkpoints"][1]["note"]


def test_budget_plan_by_the_numbers(python_corpus):
    live = LiveObserver(python_corpus / "x.json", load_corpus(str(python_corpus)), TINY)
    try:
        assert live.plan(0, 100) == (1.0, None)  # step 0: always, and it sets the cost
        live.full_cost, live.train_seconds = 2.0, 50.0
        # At step 50 of 100: 100 s projected, 10 s allowed at 10%.
        live.spent = 2.0  # 8 s left, 2 s held back for the last step: 6 s, room for a full one
        assert live.plan(50, 100) == (1.0, None)
        live.spent = 7.0  # 3 - 2 = 1 s: half a measurement
        fraction, note = live.plan(50, 100)
        assert fraction == pytest.approx(0.5) and "shrunk" in note
        live.spent = 7.9  # 0.1 s: below min_fraction (0.25 of 2 s) → skipped
        assert live.plan(50, 100)[0] == 0.0
        live.train_seconds = 100.0  # at the last step nothing is held back, and it is never skipped
        live.spent = 9.9
        assert live.plan(100, 100)[0] == pytest.approx(0.25)
    finally:
        live.close()


def test_a_resumed_run_keeps_the_earlier_records(python_corpus, tmp_path):
    out = tmp_path / "run"
    first = tiny_train_config(python_corpus, steps=16)
    train(
        TINY_MODEL,
        first,
        out,
        progress=False,
        on_checkpoint=ObservabilityCallback(out, settings=TINY),
    )
    before = json.loads((out / "trajectory" / "trajectory.json").read_text())
    assert [r["step"] for r in before["checkpoints"]] == [0, 8, 16]
    # A later process of this run, resuming at step 16, starts from the records before it.
    live = LiveObserver(
        out / "trajectory" / "trajectory.json", load_corpus(str(python_corpus)), TINY
    )
    try:
        live._resume(16)
        assert sorted(live.observer.records) == [0, 8]
        assert live.spent == pytest.approx(sum(r["seconds"] for r in before["checkpoints"][:2]))
    finally:
        live.close()


def test_hugging_face_trainer_callback(python_corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="the transformers Trainer needs accelerate")
    from torch.utils.data import Dataset

    from nnobs.data.encoding import token_stream
    from nnobs.data.tokenizer import byte_tokenizer
    from nnobs.observe.live_hf import HFObservabilityCallback

    transformers.logging.set_verbosity_error()
    tokenizer = byte_tokenizer()
    corpus = load_corpus(str(python_corpus))
    ids = torch.from_numpy(token_stream(corpus.train[:40], tokenizer)).long()

    class Windows(Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            window = ids[i * 64 : (i + 1) * 64]
            return {"input_ids": window, "labels": window}

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=tokenizer.vocab_size, n_positions=64,
        bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=4, save_steps=2, save_strategy="steps",
        per_device_train_batch_size=4, logging_steps=1, report_to=[], use_cpu=True,
        learning_rate=1e-3, disable_tqdm=True,
    )  # fmt: skip
    callback = HFObservabilityCallback(
        corpus, tokenizer, tmp_path / "obs", settings=TINY, budget=100.0
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Windows(), callbacks=[callback]
    )
    trainer.train()

    doc = load_result(tmp_path / "obs" / "trajectory.json")
    assert [r["step"] for r in doc["checkpoints"]] == [0, 2, 4]
    assert all(r["status"] == "observed" for r in doc["checkpoints"])
    assert doc["provenance"]["kind"] == "hf" and doc["model"] == {"n_layers": 2, "d_model": 32}
    assert doc["split_policy"].startswith("model trained on this corpus")
    assert doc["floor"]["source"] == "step 0 checkpoint"
    assert doc["collapse"]["loss"] == "probe validation tokens"  # no eval loss was logged
    assert [r["step"] for r in doc["loss_curve"]] == [1, 2, 3, 4]
    assert model.training  # handed back in training mode
