"""Data-parallel training on CPU: two gloo processes see the data one process would."""

import pytest
import safetensors.torch
import torch
from conftest import train_one_and_two_processes

from nnobs.core.rundir import read_metrics, resolve_checkpoint

ARGS = ["train", "--preset", "tiny", "--no-progress", "--set", "train.steps=30",
        "--set", "train.max_chars=60000", "--set", "train.device='cpu'"]  # fmt: skip


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path):
    one, two, done = train_one_and_two_processes(tmp_path, ARGS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("step 30, val loss") == 1  # only rank 0 reports
    val_one = read_metrics(one)[-1]["val_loss"]
    val_two = read_metrics(two)[-1]["val_loss"]
    assert abs(val_one - val_two) < 1e-3, (val_one, val_two)
    assert [r["step"] for r in read_metrics(one)] == [r["step"] for r in read_metrics(two)]
    a, b = (
        safetensors.torch.load_file(str(resolve_checkpoint(d) / "model.safetensors"))
        for d in (one, two)
    )
    for name in a:  # the same updates up to float summation order
        assert torch.allclose(a[name], b[name], atol=1e-4), name
