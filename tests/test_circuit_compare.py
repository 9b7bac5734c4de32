"""Circuit sizes over tasks (resumable per-task records) and the dense-vs-sparse comparison:
its statistics on simulated sizes with a known truth, checkpoint matching by validation loss,
and the command end to end on tiny runs."""

from __future__ import annotations

import pytest

from nnobs.circuits import sizes
from nnobs.circuits.sizes import circuit_sizes
from nnobs.core.errors import NnobsError

# With 24 steps the tiny byte-level run does these tasks barely better than chance (about
# 0.69-0.74 nats) and the others worse, so a target of 0.75 nats gives both kinds.
TINY_TASKS = ["single_double_quote", "lambda_func", "while_return_true"]
TINY_PRUNER = {"steps": 20, "batch": 16}


def tiny_sizes(run, out, **changes):
    knobs = {"target_loss": 0.75, "pruner": TINY_PRUNER, "n_train": 32, "n_heldout": 16}
    return circuit_sizes(run, TINY_TASKS, out, progress=False, **{**knobs, **changes})


def test_sizes_record_every_task_and_resume_without_pruning(python_run, tmp_path, monkeypatch):
    first = tiny_sizes(python_run, tmp_path)
    assert first["reached"] == ["single_double_quote", "lambda_func"]
    assert first["not_reached"] == ["while_return_true"]
    missed = first["tasks"]["while_return_true"]
    assert missed["full_loss"] > 0.75 and missed["edges"] is None
    for name in first["reached"]:
        task = first["tasks"][name]
        assert task["heldout_loss"] <= 0.75 and task["full_loss"] <= 0.75
        assert task["edges"] == sum(task["edges_by_kind"].values())
        assert task["nodes"] == sum(task["nodes_by_kind"].values())
    assert first["model"]["step"] == 24 and first["model"]["totals"]["edges"]["total"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{t}.json" for t in TINY_TASKS)

    def no_pruning(*args, **kwargs):
        raise AssertionError("pruned again although every task was stored")

    monkeypatch.setattr(sizes, "prune_task", no_pruning)
    monkeypatch.setattr(sizes, "_load", no_pruning)
    assert tiny_sizes(python_run, tmp_path) == first
    with pytest.raises(AssertionError, match="pruned again"):  # other settings: computed anew
        tiny_sizes(python_run, tmp_path, n_heldout=8)


def test_sizes_refuse_unknown_tasks_and_pruner_settings(python_run, tmp_path):
    with pytest.raises(NnobsError, match="unknown Python task 'quote'"):
        circuit_sizes(python_run, ["quote"], tmp_path)
    with pytest.raises(NnobsError, match="unknown pruner setting 'k'"):
        circuit_sizes(python_run, TINY_TASKS, tmp_path, pruner={"k": 1})
    with pytest.raises(NnobsError, match="target loss must be positive"):
        circuit_sizes(python_run, TINY_TASKS, tmp_path, target_loss=0.0)
    assert not any(tmp_path.iterdir())


def test_geometric_mean_of_edges_counts_an_empty_circuit_as_one():
    records = [{"reached": True, "edges": 0}, {"reached": True, "edges": 8},
               {"reached": False, "edges": None}]  # fmt: skip
    assert sizes.geomean_edges(records) == pytest.approx(2.0)  # sqrt(1 * 9) - 1
    assert sizes.geomean_edges(records[2:]) is None
