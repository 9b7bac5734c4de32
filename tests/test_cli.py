import json
import subprocess
import sys

import pytest

import nnobs
from nnobs.cli import main
from nnobs.core.rundir import list_checkpoints, resolve_checkpoint

# The tiny preset cut down to a few steps: checkpoints at 0, 4, 8.
FAST = ["--preset", "tiny", "--no-progress", "--set", "train.steps=8",
        "--set", "train.first_checkpoint=4", "--set", "train.max_chars=30000"]  # fmt: skip


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("NNOBS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def fails(capsys, argv, message):
    """Runs ``nnobs argv``; asserts exit 2 and a one-line error containing ``message``."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert message in err, err


def test_help_version_and_no_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "Observability of transformers" in out and "train" in out
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "torchrun" in out and "tiny" in out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"nnobs {nnobs.__version__}"
    assert main([]) == 2


def test_python_dash_m():
    done = subprocess.run(
        [sys.executable, "-m", "nnobs", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == f"nnobs {nnobs.__version__}"


def test_train_then_rerun_is_a_no_op(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *FAST, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"{out}: step 8, val loss" in captured.out and "unigram baseline" in captured.out
    assert [s for s, _ in list_checkpoints(out)] == [0, 4, 8]
    assert main(["train", *FAST, "--out", str(out)]) == 0
    assert "already trained to step 8; nothing to do" in capsys.readouterr().err


def test_config_file_and_overrides(tmp_path, capsys):
    config = tmp_path / "small.toml"
    config.write_text(
        "[model]\nvocab_size = 257\nd_model = 32\nn_layers = 1\nn_heads = 2\nmax_seq_len = 32\n"
        '[train]\ntokenizer = "byte"\nmax_chars = 30000\nseq_len = 32\nbatch_size = 4\n'
        "steps = 4\neval_batches = 1\n"
    )
    out = tmp_path / "run"
    argv = ["train", "--config", str(config), "--out", str(out), "--no-progress"]
    assert main([*argv, "--set", "model.d_mlp=[16]", "--set", "model.activation=relu"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["model_config"]["d_mlp"] == [16] and run["model_config"]["activation"] == "relu"
    assert run["train_config"]["steps"] == 4


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--config", "missing.toml"], "config file 'missing.toml' does not exist"),
        (["--preset", "huge"], "unknown preset 'huge': choose one of default, dense, sparse, tiny"),
        (["--preset", "tiny", "--set", "model.colour=1"], "unknown model knob(s) colour"),
        (["--preset", "tiny", "--set", "model.activation=tanh"], "unknown activation 'tanh'"),
        (["--preset", "tiny", "--set", "model.d_model=66"], "not divisible by n_heads=4"),
        (["--preset", "tiny", "--set", "train.speed=2"], "unknown train setting(s) speed"),
        (["--preset", "tiny", "--set", "train.steps=many"], "train.steps must be an integer"),
        (["--preset", "tiny", "--set", "d_model=3"], "is not section.key=value"),
        (["--preset", "tiny", "--set", "train.corpus=/no/such/dir"], "corpus '/no/such/dir' "),
        (["--preset", "tiny", "--set", "train.seq_len=128"], "exceeds model.max_seq_len=64"),
    ],
)
def test_bad_settings(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    fails(capsys, ["train", *extra, "--out", str(out)], message)
    assert not out.exists()  # nothing half-written


def test_bad_config_files(tmp_path, capsys):
    fails(capsys, ["train", "--config", str(tmp_path)], "cannot be read")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nd_model = 64\n")
    fails(capsys, ["train", "--config", str(bad)], "is not valid TOML")
    bad.write_text("[modle]\nd_model = 64\n")
    fails(capsys, ["train", "--config", str(bad)], "unexpected top-level entries (modle)")
    assert not (tmp_path / "runs").exists()


def test_empty_corpus(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.py").write_text("  \n")
    (corpus / "b.py").write_text("\n")
    out = tmp_path / "run"
    fails(capsys, ["train", *FAST, "--set", f"train.corpus={corpus}", "--out", str(out)], "empty")
    (corpus / "a.py").unlink()
    (corpus / "b.py").rename(corpus / "b.bin")
    fails(capsys, ["train", *FAST, "--set", f"train.corpus={corpus}", "--out", str(out)],
          "has no text files")  # fmt: skip
    assert not out.exists()


def test_out_holding_something_else(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *FAST, "--out", str(out)]) == 0
    deeper = ["train", *FAST, "--set", "model.n_layers=3", "--out", str(out)]
    fails(
        capsys,
        deeper,
        "holds a different run (model config differs: n_layers 2 in the run vs 3 requested)",
    )
    assert main([*deeper, "--overwrite"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["model_config"]["n_layers"] == 3
    (out / "run.json").write_text(json.dumps({"format": "someone-else", "model_config": {}}))
    fails(capsys, ["train", *FAST, "--out", str(out)], "is not an nnobs run description")
    (out / "run.json").write_text("{not json")
    fails(capsys, ["train", *FAST, "--out", str(out)], "is unreadable or corrupt")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    fails(capsys, ["train", *FAST, "--out", str(mine)], "is not an empty directory or an nnobs run")


def test_corrupt_checkpoint_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *FAST, "--out", str(out)]) == 0
    capsys.readouterr()
    last = resolve_checkpoint(out)
    (last / "meta.json").rename(tmp_path / "meta.json")  # as if the last save never finished
    weights = out / "checkpoints" / "step_000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    fails(capsys, ["train", *FAST, "--out", str(out)], "are corrupt")


def test_keyboard_interrupt_exits_130(tmp_path, capsys, monkeypatch):
    import nnobs.training.trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(nnobs.training.trainer, "train", interrupted)
    assert main(["train", *FAST, "--out", str(tmp_path / "run")]) == 130


def test_every_preset_is_a_valid_run():
    from nnobs.training.runconfig import load_run_config, preset_names

    assert {"tiny", "default"} <= set(preset_names())
    for name in preset_names():
        model, train = load_run_config(name)
        assert train.seq_len <= model.max_seq_len, name
    model, train = load_run_config("tiny", overrides=["model.d_mlp=[8, 16]", "train.lr=1e-3"])
    assert model.d_mlp == [8, 16] and train.lr == 1e-3
