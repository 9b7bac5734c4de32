"""nnobs finetune: a new run from the parent's weights on another corpus, naming its parent."""

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from nnobs.cli import main
from nnobs.core.rundir import list_checkpoints
from nnobs.models.checkpoint import load_checkpoint


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread, nnobs_cache):
    pass


@pytest.fixture(scope="session")
def stdlib_test_files(tmp_path_factory) -> Path:
    """60 short files of the standard library's test package: a second domain (one folder per
    session, whichever module asks first)."""
    root = Path(sysconfig.get_paths()["stdlib"]) / "test"
    files = sorted(root.glob("test_*.py"))[:60]
    out = tmp_path_factory.getbasetemp() / "stdlib-test-files"
    if out.is_dir():
        return out
    out.mkdir()
    for i, path in enumerate(files):
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()[:60]
        (out / f"t{i:03d}.py").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def finetuned_run(python_run, stdlib_test_files, nnobs_cache, tmp_path_factory) -> Path:
    """``python_run`` fine-tuned for 12 steps on ``stdlib_test_files``; built once per session
    (other test modules import this fixture)."""
    from conftest import torch_threads

    out = tmp_path_factory.getbasetemp() / "finetuned" / "run"
    if (out / "checkpoints" / "step_000012" / "meta.json").is_file():
        return out
    with torch_threads(1):
        argv = ["finetune", python_run, "--corpus", stdlib_test_files, "--steps", "12",
                "--device", "cpu", "--out", out]  # fmt: skip
        assert main([str(a) for a in argv]) == 0
    return out


def test_finetuned_run_starts_from_the_parent_and_names_it(
    python_run, finetuned_run, stdlib_test_files
):
    run = json.loads((finetuned_run / "run.json").read_text())
    parent = run["finetuned_from"]
    assert parent["run"] == str(Path(python_run).resolve())
    assert parent["checkpoint"]["step"] == 24
    assert run["train_config"]["steps"] == 12 and run["corpus"]["spec"] == str(stdlib_test_files)
    steps = [s for s, _ in list_checkpoints(finetuned_run)]
    assert steps[0] == 0 and steps[-1] == 12
    start = load_checkpoint(finetuned_run, step=0).model.state_dict()
    end = load_checkpoint(finetuned_run, step=12).model.state_dict()
    before = load_checkpoint(python_run).model.state_dict()
    assert all(torch.equal(start[k], before[k]) for k in before)  # the parent's weights
    assert any(not torch.equal(end[k], before[k]) for k in before)  # and then trained on
    assert load_checkpoint(finetuned_run).tokenizer.fingerprint == (
        load_checkpoint(python_run).tokenizer.fingerprint
    )


def test_refusals(python_run, stdlib_test_files, tmp_path, expect_refusal):
    empty = tmp_path / "empty"
    empty.mkdir()
    small = tmp_path / "small"
    small.mkdir()
    for i in range(12):
        (small / f"s{i}.py").write_text(f"x = {i}\n" * 40)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    out = tmp_path / "out"
    rows = [
        ([python_run, "--corpus", empty, "--steps", "5", "--out", out], "empty"),
        ([python_run, "--corpus", small, "--steps", "400", "--out", out], "too small for 400"),
        (
            [tmp_path, "--corpus", stdlib_test_files, "--steps", "5", "--out", out],
            "not an nnobs run",
        ),
        ([python_run, "--steps", "0", "--out", out], "train.steps"),
        (
            [python_run, "--corpus", stdlib_test_files, "--steps", "5", "--out", occupied],
            "not empty",
        ),
    ]
    for argv, message in rows:
        expect_refusal(["finetune", *argv], message, watch=[out, occupied, python_run])
