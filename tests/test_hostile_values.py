"""Wrong values, refused in one line before any work, and output that does not mislead: every
config value checked by type and range, a run that diverges stopped, a damaged training state
named, devices checked against the machine, observation that measured nothing said so, and a
probe direction applied only to the model it was fitted on.

Command-line cases go through ``expect_refusal`` (conftest.py): exit status 2, one line
``error: …``, no traceback, and no file under the watched paths created or changed.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from nnobs.cli import main
from nnobs.core.errors import NnobsError
from nnobs.core.rundir import list_checkpoints, read_metrics
from nnobs.models.load import load_model
from nnobs.observe.settings import ObserveSettings
from nnobs.observe.splits import layer_sites
from nnobs.observe.study_summary import observed_checkpoints


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread, nnobs_cache):
    pass


def train_argv(corpus: Path, out: Path, *sets: str) -> list[str]:
    """The tiny preset on ``corpus``, 8 steps with checkpoints at 0, 4 and 8, and ``sets``."""
    settings = [f"train.corpus={corpus}", "train.steps=8", "train.first_checkpoint=4", *sets]
    return [
        *("train", "--preset", "tiny", "--no-progress", "--out", str(out)),
        *(arg for s in settings for arg in ("--set", s)),
    ]


@pytest.fixture(scope="module")
def few_docs(tmp_path_factory) -> Path:
    """Six long documents: plenty to train on, but a validation split of one document, which
    the probe cannot split into two held-out halves, so every observation fails."""
    root = tmp_path_factory.mktemp("few-docs")
    text = Path(json.__file__).read_text(encoding="utf-8")
    for i in range(6):
        (root / f"m{i}.py").write_text(f"# module {i}\n{text[:4000]}", encoding="utf-8")
    return root


# ------------------------------------------------------------------------ config values


@pytest.mark.parametrize(
    "value, message",
    [
        ("train.lr=nan", "train.lr must be a finite number, got nan"),
        ("train.lr=inf", "train.lr must be a finite number, got inf"),
        ("train.weight_decay=-inf", "train.weight_decay must be a finite number"),
        ('model.rope_base="abc"', "model.rope_base must be a finite number, got 'abc'"),
        ("model.rope_base=abc", "model.rope_base must be a finite number, got 'abc'"),
        ("model.rope_base=1", "model.rope_base must be a number > 1"),
        ("model.aux_weight=nan", "model.aux_weight must be a finite number"),
        ("train.batch_size=1e8", "train.batch_size must be an integer >= 1, got 100000000.0 (a"),
        ("model.d_model=true", "model.d_model must be an integer >= 1, got True"),
        ("model.n_kv_heads=true", "model.n_kv_heads must be an integer >= 1, got True"),
        ("model.d_mlp=true", "model.d_mlp must be a positive integer or a list"),
        ('model.tie_embeddings="no"', "model.tie_embeddings must be true or false, got 'no'"),
        ("model.tie_embeddings=no", "model.tie_embeddings must be true or false, got 'no'"),
        ("model.bias=2", "model.bias must be true or false, got 2"),
        ("train.bf16=1", "train.bf16 must be true or false, got 1"),
        ("train.seed=-1", "train.seed must be an integer in [0, "),
        ("train.device=tpu", "train.device must be auto, cpu or cuda"),
        ("train.steps=100000000000000000", "checkpoints, more than 10000"),
        # Bounded by the corpus, not by memory: a step may not hold more tokens than the
        # training split, nor the evaluation more windows than the validation split has.
        ("train.batch_size=100000000", "hold more tokens than the training split"),
        ("train.eval_batches=100000", "validation windows are more than the validation split"),
    ],
)
def test_a_bad_value_is_refused_before_anything_is_written(
    expect_refusal, python_corpus, tmp_path, value, message
):
    expect_refusal(train_argv(python_corpus, tmp_path / "run", value), message, watch=[tmp_path])
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a cuda:7")
def test_a_device_the_machine_lacks_is_refused(expect_refusal, python_corpus, tmp_path):
    argv = train_argv(python_corpus, tmp_path / "run", "train.device=cuda:7")
    line = expect_refusal(argv, "train.device 'cuda:7' is not a device of this machine: use cpu")
    assert not (tmp_path / "run").exists() and "cpu" in line


def test_the_corrected_command_runs_after_a_refused_one(expect_refusal, python_corpus, tmp_path):
    out = tmp_path / "run"
    expect_refusal(train_argv(python_corpus, out, "train.lr=nan"), "train.lr must be a finite")
    assert main(train_argv(python_corpus, out, "train.lr=1e-3")) == 0
    assert [s for s, _ in list_checkpoints(out)] == [0, 4, 8]


def test_overwrite_with_a_refused_value_keeps_the_old_run(expect_refusal, python_corpus, tmp_path):
    out = tmp_path / "run"
    assert main(train_argv(python_corpus, out)) == 0
    argv = [*train_argv(python_corpus, out, "train.batch_size=100000000"), "--overwrite"]
    expect_refusal(argv, "hold more tokens", watch=[out / "run.json", out / "checkpoints"])
    assert [s for s, _ in list_checkpoints(out)] == [0, 4, 8]


# ----------------------------------------------------------------------------- divergence


def test_a_run_that_diverges_stops_and_keeps_its_last_good_checkpoint(
    expect_refusal, python_corpus, tmp_path
):
    out = tmp_path / "run"
    line = expect_refusal(train_argv(python_corpus, out, "train.lr=1e30"), "training diverged")
    assert "is nan" in line and "Lower train.lr (now 1e+30)" in line, line
    assert "the checkpoints up to step 0 are kept" in line, line
    assert [s for s, _ in list_checkpoints(out)] == [0]  # nothing after it went wrong
    assert all(math.isfinite(r["loss"]) for r in read_metrics(out) if "loss" in r)


# ------------------------------------------------------------------ damaged training state


def _edit_json(name: str, edit):
    """A damage: the JSON file ``name`` of a checkpoint, changed in place by ``edit``."""

    def change(ckpt: Path) -> None:
        data = json.loads((ckpt / name).read_text())
        edit(data)
        (ckpt / name).write_text(json.dumps(data))

    return change


def _edit_tensors(name: str, edit):
    """A damage: the tensors of the safetensors file ``name``, changed in place by ``edit``."""

    def change(ckpt: Path) -> None:
        tensors = safetensors.torch.load_file(ckpt / name)
        edit(tensors)
        safetensors.torch.save_file(tensors, ckpt / name)

    return change


# case -> (how the resumed checkpoint is damaged, a piece of the error line it must give)
DAMAGE = {
    "rng-numpy-string": (_edit_json("rng.json", lambda d: d.update(numpy="abc")), "RNG state"),
    "rng-python-short": (
        _edit_json("rng.json", lambda d: d["python"].__setitem__(1, d["python"][1][:5])),
        "RNG state",
    ),
    "rng-key-missing": (_edit_json("rng.json", lambda d: d.pop("python")), "'python' is missing"),
    "rng-gauss-string": (
        _edit_json("rng.json", lambda d: d["python"].__setitem__(2, "x")),
        "gauss_next is 'x', not a float",
    ),
    "rng-torch-short": (
        _edit_tensors("rng.safetensors", lambda t: t.update(torch_cpu=t["torch_cpu"][:10])),
        "RNG state",
    ),
    "rng-not-an-object": (lambda c: (c / "rng.json").write_text("[1, 2]"), "rng.json"),
    "optimizer-shape": (
        _edit_tensors(
            "optimizer.safetensors", lambda t: t.update({"0.exp_avg": t["0.exp_avg"][:1]})
        ),
        "parameter 0's exp_avg is a torch.float32 tensor of shape (1, 64)",
    ),
    "optimizer-dtype": (
        _edit_tensors(
            "optimizer.safetensors", lambda t: t.update({"0.exp_avg": t["0.exp_avg"].long()})
        ),
        "torch.int64",
    ),
    "optimizer-key-missing": (
        _edit_tensors("optimizer.safetensors", lambda t: t.pop("0.exp_avg_sq")),
        "parameter 0 lacks exp_avg_sq",
    ),
    "optimizer-extra-entry": (
        _edit_tensors("optimizer.safetensors", lambda t: t.update({"99.exp_avg": torch.ones(2)})),
        "its entry '99' names none of the",
    ),
    "optimizer-scalars-list": (
        _edit_json("optimizer.json", lambda d: d.update(scalars=[])),
        "list",
    ),
    "optimizer-groups": (
        _edit_json("optimizer.json", lambda d: d.update(param_groups=[])),
        "parameter groups",
    ),
    "optimizer-garbage": (
        lambda c: (c / "optimizer.safetensors").write_bytes(b"garbage"),
        "optimizer.safetensors' is corrupt",
    ),
    "meta-tokens-seen": (
        _edit_json("meta.json", lambda d: d.update(tokens_seen="many")),
        "has tokens_seen 'many', not a count",
    ),
}


@pytest.fixture(scope="module")
def halfway_run(python_corpus, tmp_path_factory) -> Path:
    """A run trained to step 8, whose step-8 checkpoint is then removed: it resumes from 4."""
    out = tmp_path_factory.mktemp("halfway") / "run"
    assert main(train_argv(python_corpus, out)) == 0
    shutil.rmtree(out / "checkpoints" / "step_000008")
    return out


@pytest.mark.parametrize("case", DAMAGE)
def test_an_edited_training_state_names_the_damaged_checkpoint(
    expect_refusal, python_corpus, halfway_run, tmp_path, case
):
    out = tmp_path / "run"
    shutil.copytree(halfway_run, out)
    damage, message = DAMAGE[case]
    ckpt = out / "checkpoints" / "step_000004"
    damage(ckpt)
    line = expect_refusal(
        train_argv(python_corpus, out),
        message,
        watch=[out / "checkpoints", out / "metrics.jsonl", out / "run.json"],
    )
    assert line.startswith(f"error: checkpoint {str(ckpt)!r} is damaged: "), line
    assert line.endswith("delete it to resume from the checkpoint before it"), line


def test_optimizer_hyperparameters_come_from_the_train_config(python_corpus, halfway_run, tmp_path):
    """An edited hyperparameter in optimizer.json changes nothing: a resumed run shares the
    run's train config, from which the optimizer is built."""
    out = tmp_path / "run"
    shutil.copytree(halfway_run, out)
    _edit_json("optimizer.json", lambda d: d["param_groups"][0].update(betas="x"))(
        out / "checkpoints" / "step_000004"
    )
    assert main(train_argv(python_corpus, out)) == 0
    assert [s for s, _ in list_checkpoints(out)] == [0, 4, 8]


# ------------------------------------------------------------------------------- devices


@pytest.mark.parametrize("device", ["tpu", "cuda:7", "gpu"])
@pytest.mark.parametrize(
    "command",
    [
        "observe --model {run} --out {out} --no-progress",
        "observe --model {run} --out {out} --all-checkpoints --no-progress",
        "ablate --model {run} --out {out} --site blocks.0.mlp_out",
        "patch --model {run} --out {out} --task quote --no-progress",
    ],
)
def test_a_device_the_machine_lacks_is_refused_by_every_command(
    expect_refusal, python_run, tmp_path, command, device
):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    argv = [*command.format(run=python_run, out=tmp_path / "out").split(), "--device", device]
    line = expect_refusal(argv, f"device {device!r} is not a device of this machine: use cpu",
                          watch=[tmp_path, python_run])  # fmt: skip
    assert "cuda:0" in line or not torch.cuda.is_available()


# ------------------------------------------------------------------------ observe settings


@pytest.mark.parametrize(
    "options, message",
    [
        (["--seeds", "43,43"], "seeds must be distinct, got [43, 43]"),
        (["--seeds", "43,44,43", "--all-checkpoints"], "seeds must be distinct"),
        (["--n-boot", "0"], "n_boot must be an integer >= 1, got 0"),
        (["--n-boot", "0", "--all-checkpoints"], "n_boot must be an integer >= 1, got 0"),
        (["--seeds", ""], "the protocol needs at least 2 seeds"),
        (["--batch-size", "0"], "batch_size must be an integer >= 1, got 0"),
    ],
)
def test_observe_settings_that_would_mislead_are_refused(
    expect_refusal, python_run, tmp_path, options, message
):
    argv = ["observe", "--model", python_run, "--out", tmp_path / "out", "--no-progress"]
    expect_refusal([*argv, *options], message, watch=[tmp_path, python_run])


def test_a_negative_layer_is_resolved_to_its_index(python_run):
    adapter = load_model(python_run)
    settings = ObserveSettings(layers=[-1, 0])
    assert layer_sites(adapter, settings) == {1: "blocks.1.resid_post", 0: "blocks.0.resid_post"}
    with pytest.raises(NnobsError, match="layer -3 is out of range"):
        layer_sites(adapter, ObserveSettings(layers=[-3]))


# -------------------------------------------------------------------------- non-finite weights


@pytest.fixture
def nan_run(python_run, tmp_path) -> Path:
    """A copy of the tiny run whose last checkpoint holds a NaN weight."""
    run = tmp_path / "nan-run"
    shutil.copytree(python_run, run)
    weights = list_checkpoints(run)[-1][1] / "model.safetensors"
    tensors = safetensors.torch.load_file(weights)
    tensors["blocks.0.mlp.down.weight"][0, 0] = float("nan")
    safetensors.torch.save_file(tensors, weights)
    return run


def test_nan_weights_are_named_as_such_not_as_a_precision_problem(
    expect_refusal, nan_run, tmp_path
):
    argv = ["ablate", "--model", nan_run, "--out", tmp_path / "out", "--site", "blocks.0.mlp_out"]
    message = "the model's weights are not finite (checkpoint damaged or diverged)"
    line = expect_refusal(argv, message, watch=[tmp_path])
    assert "blocks.0.mlp.down.weight has 1 non-finite" in line and "float32" not in line


def test_a_trajectory_records_nan_weights_as_such(nan_run, python_corpus):
    from nnobs.observe.trajectory import TrajectorySettings, observe_run

    last = list_checkpoints(nan_run)[-1][0]
    settings = TrajectorySettings(ex_per_dim=10, doc_tokens=64, seeds=[43, 44], n_boot=20,
                                  random_heads=10)  # fmt: skip
    doc = observe_run(nan_run, settings=settings, steps=[last], progress=False)
    record = doc["checkpoints"][-1]
    assert record["status"] == "failed", record
    assert "weights are not finite (checkpoint damaged or diverged)" in record["note"]
    assert "float32" not in record["note"]


# --------------------------------------------------------------- observation that fails


def test_train_observe_says_when_no_checkpoint_could_be_observed(
    expect_refusal, few_docs, tmp_path
):
    out = tmp_path / "run"
    message = "observation failed at every checkpoint (the corpus's validation split is too small"
    line = expect_refusal([*train_argv(few_docs, out), "--observe"], message)
    assert f"nnobs observe --model {out} --all-checkpoints --corpus SPEC" in line
    assert [s for s, _ in list_checkpoints(out)] == [0, 4, 8]  # the trained run is kept
    doc = json.loads((out / "trajectory" / "trajectory.json").read_text())
    assert {r["status"] for r in doc["checkpoints"]} == {"failed"}


def test_a_study_whose_observation_fails_everywhere_says_so(expect_refusal, few_docs, tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(
        '[study]\nname = "tiny"\nbaseline = "pre"\nseeds = [0]\n'
        "[model]\nvocab_size = 257\nd_model = 32\nn_layers = 2\nn_heads = 4\nmax_seq_len = 64\n"
        f'[train]\ncorpus = "{few_docs}"\ntokenizer = "byte"\nseq_len = 64\nbatch_size = 8\n'
        "steps = 8\nwarmup_steps = 2\neval_every = 4\neval_batches = 2\nfirst_checkpoint = 4\n"
        "[observe]\nex_per_dim = 10\ndoc_tokens = 64\nseeds = [43, 44]\nn_boot = 20\n"
        '[[variants]]\nname = "pre"\n'
        '[[variants]]\nname = "post"\nmodel = { norm_placement = "post" }\n'
    )
    out = tmp_path / "study"
    line = expect_refusal(["study", "--config", config, "--out", out, "--no-progress"],
                          "2 of 2 runs failed (pre seed 0: observation failed at every "
                          "checkpoint of")  # fmt: skip
    assert "validation split is too small" in line and not (out / "study.json").exists()


def test_a_run_entry_without_an_observed_checkpoint_is_an_error_not_an_index_error(tmp_path):
    doc = {"checkpoints": [{"step": 0, "status": "failed", "note": "corpus too small"}]}
    with pytest.raises(NnobsError, match=r"every checkpoint of '.*run' \(corpus too small\)"):
        observed_checkpoints(doc, tmp_path / "run")


# ------------------------------------------------------------- probe direction provenance


@pytest.fixture(scope="module")
def observed(python_run, python_corpus, tmp_path_factory) -> Path:
    """An observe result of the tiny run's last checkpoint, its layers given from the end."""
    out = tmp_path_factory.mktemp("observed")
    argv = ["observe", "--model", python_run, "--corpus", python_corpus, "--domain2", "none",
            "--ex-per-dim", "10", "--seeds", "43,44", "--n-boot", "20", "--null-models", "0",
            "--layers=-1", "--no-progress", "--out", out]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    return out / "observe.json"


def test_observe_writes_the_layer_a_negative_index_resolved_to(observed):
    doc = json.loads(observed.read_text())
    assert doc["settings"]["layers"] == [-1]  # as asked; every result names the real layer
    assert [r["layer"] for r in doc["sweep"] + doc["multiseed"]] == [1, 1]
    assert doc["layer"] == doc["headline"]["layer"] == doc["probe"]["layer"] == 1


def test_a_probe_direction_is_applied_only_to_its_own_model(
    expect_refusal, python_run, observed, tmp_path
):
    argv = ["ablate", "--model", python_run, "--direction-from", observed, "--windows", "4",
            "--window-len", "16", "--n-boot", "20"]  # fmt: skip
    argv = [str(a) for a in argv]
    line = expect_refusal([*argv, "--step", "8", "--out", tmp_path / "other"],
                          "holds a probe of another model (step 24 there, 8 here)",
                          watch=[tmp_path])  # fmt: skip
    assert "--allow-other-model" in line
    assert main([*argv, "--out", str(tmp_path / "same")]) == 0
    out = tmp_path / "forced"
    assert main([*argv, "--step", "8", "--out", str(out), "--allow-other-model"]) == 0
    assert (out / "direction.json").is_file()
