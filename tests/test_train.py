import math

import numpy as np
import pytest
import safetensors.torch
import torch

from nnobs.core.errors import NnobsError
from nnobs.core.files import read_json
from nnobs.core.rundir import list_checkpoints, read_meta, read_metrics, resolve_checkpoint
from nnobs.models.checkpoint import load_checkpoint
from nnobs.models.config import ModelConfig
from nnobs.training.config import TrainConfig
from nnobs.training.schedule import batch_starts, checkpoint_steps, lr_at
from nnobs.training.tokens import unigram_loss
from nnobs.training.trainer import train

MC = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)
TC = TrainConfig(
    corpus="stdlib", max_chars=40_000, tokenizer="byte", seq_len=32, batch_size=8, steps=12,
    lr=1e-2, warmup_steps=2, eval_every=100, eval_batches=2, log_every=4, first_checkpoint=4,
    checkpoint_every=8, device="cpu",
)  # fmt: skip


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("NNOBS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def weights(run_dir, step=None):
    path = resolve_checkpoint(run_dir, step) / "model.safetensors"
    return safetensors.torch.load_file(str(path))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---------------------------------------------------------------------------- schedules


def test_checkpoint_schedule():
    assert checkpoint_steps(2500, 16, 1024) == [0, 16, 32, 64, 128, 256, 512, 1024, 2048, 2500]
    assert checkpoint_steps(100, 16, 1024) == [0, 16, 32, 64, 100]
    assert checkpoint_steps(64, 16, 32) == [0, 16, 32, 64]
    assert checkpoint_steps(10, 16, 1024) == [0, 10]
    assert checkpoint_steps(1000, 100, 250) == [0, 100, 200, 250, 500, 750, 1000]


def test_lr_schedule_warmup_then_cosine_to_floor():
    tc = TrainConfig(steps=110, lr=1e-3, min_lr_ratio=0.1, warmup_steps=10)
    assert lr_at(0, tc) == pytest.approx(1e-4)
    assert lr_at(9, tc) == pytest.approx(1e-3)
    assert lr_at(60, tc) == pytest.approx(0.55e-3)  # halfway down the cosine
    assert lr_at(110, tc) == pytest.approx(1e-4)
    lrs = [lr_at(s, tc) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_batches_are_a_pure_function_of_seed_and_step():
    a = batch_starts(3, 17, 10_000, 64, 32)
    assert np.array_equal(a, batch_starts(3, 17, 10_000, 64, 32))
    assert not np.array_equal(a, batch_starts(3, 18, 10_000, 64, 32))
    assert not np.array_equal(a, batch_starts(4, 17, 10_000, 64, 32))
    many = batch_starts(0, 0, 100, 10, 5000)
    assert many.min() == 0 and many.max() == 89  # every window fits: start + 10 + 1 <= 100


def test_unigram_loss_by_hand():
    train_ids = np.array([0, 0, 0, 1])  # counts + 1: [4, 2, 1] over 7
    val_ids = np.array([0, 2])
    expected = -(math.log(4 / 7) + math.log(1 / 7)) / 2
    assert unigram_loss(train_ids, val_ids, 3) == pytest.approx(expected)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"steps": 0}, "train.steps must be an integer >= 1"),
        ({"lr": -1.0}, "train.lr must be a number >= 0"),
        ({"lr": 0}, "train.lr must be > 0"),
        ({"batch_size": 2.5}, "train.batch_size must be an integer"),
        ({"tokenizer": "wordpiece"}, "unknown tokenizer 'wordpiece'"),
        ({"betas": [0.9]}, "train.betas must be two numbers"),
        ({"device": "tpu"}, "train.device must be auto, cpu or cuda"),
        ({"colour": 1}, "unknown train setting"),
    ],
)
def test_train_config_validation(change, message):
    with pytest.raises(NnobsError, match=message):
        TC.replace(**change)


# ------------------------------------------------------------------------------ training


KNOBS = {
    "relu": {"activation": "relu"},
    "swiglu": {"activation": "swiglu"},
    "rmsnorm": {"norm": "rmsnorm"},
    "no_norm": {"norm": "none"},
    "post_norm": {"norm_placement": "post"},
    "no_residual": {"residual": "none"},
    "rope": {"positions": "rope"},
    "untied": {"tie_embeddings": False},
    "bias": {"bias": True},
    "gqa": {"n_kv_heads": 2},
    "bottleneck": {"d_mlp": [128, 8]},
    "aux": {"aux_layer": 0, "aux_weight": 0.5},
    "act_sparse": {"act_keep": 0.25},
    "sinks_no_positions": {"attn_sinks": True, "positions": "none"},
}


@pytest.mark.parametrize("knob", KNOBS)
def test_every_knob_trains(tmp_path, knob):
    result = train(MC.replace(**KNOBS[knob]), TC, tmp_path, progress=False)
    records = read_metrics(tmp_path)
    first = records[0]["val_loss"]
    assert first == pytest.approx(math.log(257), abs=0.3)  # near-uniform at initialisation
    assert result.val_loss < first - 0.5, (knob, first, result.val_loss)
    assert result.val_loss == records[-1]["val_loss"]
    if knob == "aux":
        assert all("aux_loss" in r for r in records[1:])


def test_run_directory_layout(tmp_path):
    result = train(MC, TC, tmp_path, progress=False)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [0, 4, 8, 12]
    run = read_json(tmp_path / "run.json", "run")
    assert run["model_config"] == MC.to_dict() and run["train_config"] == TC.to_dict()
    assert run["tokenizer"]["kind"] == "byte" and run["n_params"] > 0
    assert run["corpus"]["fingerprint"] and run["corpus"]["tokens"]["train"] > 20_000
    assert 2.0 < run["unigram_baseline_loss"] < math.log(257)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 4, 8, 12]
    assert {"loss", "lm_loss", "val_loss", "lr", "tokens_seen", "tokens_per_s"} <= set(records[-1])
    assert records[-1]["tokens_seen"] == result.tokens_seen == 12 * 8 * 32
    meta = read_meta(tmp_path / "checkpoints" / "step_000012")
    assert meta["val_loss"] == result.val_loss and meta["tokens_seen"] == 12 * 8 * 32
    loaded = load_checkpoint(tmp_path)
    assert loaded.step == 12 and loaded.tokenizer.kind == "byte"


def test_same_seed_same_weights_different_seed_different(tmp_path):
    train(MC, TC, tmp_path / "a", progress=False)
    train(MC, TC, tmp_path / "b", progress=False)
    train(MC, TC.replace(seed=1), tmp_path / "c", progress=False)
    train(MC, TC.replace(seed=1, data_seed=0), tmp_path / "d", progress=False)
    a, b, c = (weights(tmp_path / k) for k in "abc")
    assert_same_weights(a, b)
    assert not torch.equal(a["tok_emb.weight"], c["tok_emb.weight"])
    # data_seed pins the data order alone: same initialisation as c, same data as a
    assert_same_weights(weights(tmp_path / "c", 0), weights(tmp_path / "d", 0))
    assert not torch.equal(c["tok_emb.weight"], weights(tmp_path / "d")["tok_emb.weight"])


def test_resume_from_an_earlier_checkpoint_is_exact(tmp_path):
    train(MC, TC, tmp_path / "full", progress=False)
    out = tmp_path / "cut"
    train(MC, TC, out, progress=False)
    # As if killed just after step 4 was saved (and mid-way through saving step 8).
    for step in (8, 12):
        (out / "checkpoints" / f"step_{step:06d}").rename(
            out / "checkpoints" / f".tmp-step_{step:06d}-x"
        )
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "lo')  # a record cut short by the kill
    result = train(MC, TC, out, progress=False)
    assert result.resumed_from == 4
    assert_same_weights(weights(tmp_path / "full"), weights(out))
    assert [r["step"] for r in read_metrics(out)] == [0, 4, 8, 12]
    assert not list((out / "checkpoints").glob(".tmp-*"))


class StepRecorder:
    def __init__(self):
        self.steps = []

    def on_step(self, model, optimizer, step):
        assert model.training and isinstance(optimizer, torch.optim.AdamW)
        self.steps.append(step)


class ZeroEmbeddingsAt:
    """Zero the (tied) token embeddings after update ``at``: every logit is then 0."""

    def __init__(self, at):
        self.at = at

    def on_step(self, model, optimizer, step):
        if step == self.at:
            with torch.no_grad():
                model.tok_emb.weight.zero_()


def test_step_hooks_are_called_once_after_every_update(tmp_path):
    first, second = StepRecorder(), StepRecorder()
    train(MC, TC, tmp_path, progress=False, hooks=[first, second])
    assert first.steps == second.steps == list(range(1, 13))
    # A run resumed from step 4 calls them for the updates it makes.
    for step in (8, 12):
        (tmp_path / "checkpoints" / f"step_{step:06d}").rename(
            tmp_path / "checkpoints" / f".tmp-step_{step:06d}-x"
        )
    resumed = StepRecorder()
    train(MC, TC, tmp_path, progress=False, hooks=[resumed])
    assert resumed.steps == list(range(5, 13))


def test_a_step_hook_changes_what_the_next_step_trains_and_the_checkpoint_holds(tmp_path):
    train(MC, TC.replace(log_every=1), tmp_path, progress=False, hooks=[ZeroEmbeddingsAt(4)])
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path)[1:]}  # step 0: no update
    assert losses[4] < math.log(257) - 0.1
    assert losses[5] == pytest.approx(math.log(257), abs=1e-5)  # update 5 saw uniform logits
    assert not weights(tmp_path, 4)["tok_emb.weight"].any()
    assert weights(tmp_path, 8)["tok_emb.weight"].any()


def test_finished_run_is_left_alone(tmp_path):
    train(MC, TC, tmp_path, progress=False)
    model_file = resolve_checkpoint(tmp_path) / "model.safetensors"
    stamp = model_file.stat().st_mtime_ns
    result = train(MC, TC.replace(device="auto"), tmp_path, progress=False)  # device may change
    assert result.already_complete and result.step == 12
    assert model_file.stat().st_mtime_ns == stamp
    assert len(read_metrics(tmp_path)) == 4


def test_a_different_run_is_refused_unless_overwritten(tmp_path):
    train(MC, TC, tmp_path, progress=False)
    with pytest.raises(NnobsError, match=r"holds a different run \(model config differs: "
                       r"d_model 32 in the run vs 64 requested\); use a new --out"):  # fmt: skip
        train(MC.replace(d_model=64), TC, tmp_path, progress=False)
    with pytest.raises(NnobsError, match="train config differs: steps 12 in the run vs 20"):
        train(MC, TC.replace(steps=20), tmp_path, progress=False)
    result = train(MC, TC.replace(steps=6), tmp_path, progress=False, overwrite=True)
    assert result.step == 6
    assert [s for s, _ in list_checkpoints(tmp_path)] == [0, 4, 6]


def test_refuses_to_write_into_a_foreign_directory(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(NnobsError, match="is not an empty directory or an nnobs run"):
            train(MC, TC, tmp_path, progress=False, overwrite=overwrite)
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_input_checks(tmp_path):
    with pytest.raises(NnobsError, match="seq_len=64 exceeds model.max_seq_len=32"):
        train(MC, TC.replace(seq_len=64), tmp_path, progress=False)
    with pytest.raises(NnobsError, match="set model.vocab_size=257"):
        train(MC.replace(vocab_size=100), TC, tmp_path, progress=False)
    with pytest.raises(NnobsError, match="fewer than one window"):
        train(MC, TC.replace(max_chars=300), tmp_path, progress=False)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_an_out_the_user_cannot_write_is_one_clear_error(tmp_path):
    # Run as the user meets it: root writes through permission bits, so as root the commands
    # run without that privilege (CAP_DAC_OVERRIDE), and the kernel refuses as it would them.
    import os
    import shutil
    import subprocess
    import sys

    prefix = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv to drop the right to write anywhere")
        prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    # The trainer's first step, taking its run directory's lock, as a library call:
    take_lock = (
        "import sys\nfrom nnobs.core.errors import NnobsError\n"
        "from nnobs.core.lock import lock_directory\n"
        "try:\n    lock_directory(sys.argv[1], 'run directory').__enter__()\n"
        "except NnobsError as e:\n    sys.exit(f'error: {e}')"
    )
    try:
        for out, what in [(locked, "cannot write to"), (locked / "run", "cannot create")]:
            argv = [*prefix, sys.executable, "-c", take_lock, str(out)]
            err = subprocess.run(argv, capture_output=True, text=True).stderr
            assert err == (
                f"error: {what} run directory {str(out)!r} (Permission denied): "
                "use a directory you can write to\n"
            )
        # And the command, which checks --out before any work (either check may answer).
        argv = [*prefix, sys.executable, "-m", "nnobs", "train", "--preset", "tiny"]
        done = subprocess.run([*argv, "--out", str(locked / "run")], capture_output=True, text=True)
        err = done.stderr.strip()
        assert done.returncode == 2 and err.startswith("error: ") and "\n" not in err, err
        assert str(locked / "run") in err and "you can write to" in err
        assert not any(locked.iterdir())
    finally:
        locked.chmod(0o755)


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_is_bit_identical(tmp_path):
    sigkill_then_resume(tmp_path)


def sigkill_then_resume(tmp_path, extra_args=()):
    """Train the tiny preset (with ``extra_args``) once straight through and once killed
    twice and resumed: the weights and the log end identical."""
    import os
    import signal
    import subprocess
    import sys
    import time

    argv = [sys.executable, "-m", "nnobs", "train", "--preset", "tiny", "--no-progress",
            "--set", "train.steps=30", "--set", "train.max_chars=60000",
            "--set", "train.first_checkpoint=2", "--set", "train.checkpoint_every=4",
            *extra_args]  # fmt: skip
    env = {**os.environ, "NNOBS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    subprocess.run([*argv, "--out", str(tmp_path / "full")], env=env, check=True)
    out = tmp_path / "killed"
    for delay in (0.0, 0.7):  # killed twice, at different points after a checkpoint exists
        proc = subprocess.Popen([*argv, "--out", str(out)], env=env)
        while proc.poll() is None:
            done = list_checkpoints(out)
            if done and done[-1][0] > 0:
                break
            time.sleep(0.02)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = list_checkpoints(out)[-1][0]
    assert 0 < killed_at < 30
    subprocess.run([*argv, "--out", str(out)], env=env, check=True)
    assert_same_weights(weights(tmp_path / "full"), weights(out))
    steps = [r["step"] for r in read_metrics(out)]
    assert steps == [r["step"] for r in read_metrics(tmp_path / "full")]
    assert steps == sorted(set(steps))  # no duplicates after the resumes
