"""Circuit sizes over tasks (resumable per-task records) and the dense-vs-sparse comparison:
its statistics on simulated sizes with a known truth, checkpoint matching by validation loss,
and the command end to end on tiny runs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from nnobs.circuits import sizes
from nnobs.circuits.compare import (
    checkpoint_val_losses,
    log_ratios,
    match_checkpoint,
    ratio_test,
    sparse_smaller_p,
    statement,
)
from nnobs.circuits.sizes import circuit_sizes
from nnobs.core.errors import NnobsError
from nnobs.core.rundir import CHECKPOINT_FORMAT

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


# ------------------------------------------------------------------ statistics, simulated


def simulated_sizes(rng, n_sims: int, n_tasks: int, ratio: float, spread: float = 0.7):
    """Integer edge counts of ``n_sims`` comparisons over ``n_tasks`` tasks: task difficulty
    varies (log-normal base size), each model adds its own noise, the sparse model's circuits
    are ``ratio`` times smaller in expectation."""
    base = rng.normal(5.0, 1.5, (n_sims, n_tasks))
    dense = np.round(np.exp(base + rng.normal(0, spread, base.shape)))
    sparse = np.round(np.exp(base - np.log(ratio) + rng.normal(0, spread, base.shape)))
    return dense, sparse


def test_wilcoxon_verdict_keeps_its_level_under_the_null_and_finds_a_planted_ratio():
    rng = np.random.default_rng(0)
    dense, sparse = simulated_sizes(rng, 4000, 20, ratio=1.0)
    null_rate = (sparse_smaller_p(log_ratios(dense, sparse)) < 0.05).mean()
    assert 0.035 <= null_rate <= 0.065  # nominal 0.05; binomial sd over 4000 runs 0.0035
    heavy = rng.standard_t(3, (4000, 20))  # a heavy-tailed symmetric null
    assert 0.035 <= (sparse_smaller_p(heavy) < 0.05).mean() <= 0.065
    dense, sparse = simulated_sizes(rng, 4000, 20, ratio=4.0)
    logs = log_ratios(dense, sparse)
    assert (sparse_smaller_p(logs) < 0.05).mean() > 0.99
    assert np.exp(logs.mean(axis=1)).mean() == pytest.approx(4.0, rel=0.1)
    dense, sparse = simulated_sizes(rng, 4000, 20, ratio=1 / 4)  # dense smaller: not "sparse"
    assert (sparse_smaller_p(log_ratios(dense, sparse)) < 0.05).mean() < 0.001


def test_bootstrap_interval_over_tasks_covers_a_planted_ratio():
    rng = np.random.default_rng(1)
    dense, sparse = simulated_sizes(rng, 150, 20, ratio=4.0)
    covered = 0
    for d, s in zip(dense, sparse, strict=True):
        lo, hi = ratio_test(log_ratios(d, s), n_boot=300)["ci95"]
        covered += lo <= 4.0 <= hi
    assert covered / 150 >= 0.85  # 95% nominal; the percentile bootstrap at 20 tasks is a bit low


def test_ratio_test_on_a_worked_example():
    logs = np.array([0.5, 1.0, 0.2, 0.0, 2.0, 1.1])
    result = ratio_test(logs, n_boot=500)
    assert result["ratio"] == pytest.approx(np.exp(4.8 / 6))
    assert result["p_value"] == pytest.approx(1 / 32)  # 5 nonzero, all positive: exact 2^-5
    assert (result["n_sparse_smaller"], result["n_dense_smaller"]) == (5, 0)
    assert result["min_p"] == 1 / 32  # the zero task says nothing of the direction
    assert result["verdict"] == "sparse circuits smaller"
    lo, hi = result["ci95"]
    assert np.exp(0.2) < lo < result["ratio"] < hi < np.exp(2.0)
    models = {m: {"val_loss": 5.0, "step": 10} for m in ("dense", "sparse")}
    assert "too few tasks" not in statement(result, 8, models)
    assert "2 of 8 tasks excluded" in statement(result, 8, models)
    three = ratio_test(np.array([3.0, 2.9, 0.6]), n_boot=50)
    assert three["p_value"] == three["min_p"] == 1 / 8  # as small as 3 tasks can give
    assert "too few tasks: its smallest p is 0.125" in statement(three, 20, models)
    assert ratio_test(-logs, n_boot=10)["verdict"] == "not shown smaller"
    assert ratio_test(np.zeros(4), n_boot=10)["p_value"] == 1.0
    assert ratio_test(np.array([]))["verdict"] == "no task reached by both"
    assert log_ratios([0, 9], [0, 0]) == pytest.approx([0.0, np.log(10)])


# ------------------------------------------------------------------ matching


def fake_run(root, losses: dict[int, float], logged: dict[int, float]):
    """A run directory with checkpoints at the steps of ``losses`` (their metadata's validation
    loss) and a metrics file logging ``logged``."""
    for step, loss in losses.items():
        ckpt = root / "checkpoints" / f"step_{step:06d}"
        ckpt.mkdir(parents=True)
        (ckpt / "meta.json").write_text(
            json.dumps({"format": CHECKPOINT_FORMAT, "step": step, "val_loss": loss})
        )
    (root / "checkpoints" / "step_000999").mkdir()  # incomplete: no metadata, never matched
    lines = [json.dumps({"step": s, "val_loss": v}) for s, v in logged.items()]
    (root / "metrics.jsonl").write_text("\n".join([*lines, '{"step": 5, "loss": 3.0}']) + "\n")
    return root


def test_matching_picks_the_checkpoint_closest_in_validation_loss(tmp_path):
    # Step 256's metadata says 9.0 but the metrics file logged 4.1 there; the metrics win.
    run = fake_run(tmp_path, {0: 8.0, 128: 5.0, 256: 9.0, 512: 3.6, 768: 3.4},
                   {0: 8.0, 128: 5.0, 256: 4.1, 512: 3.6})  # fmt: skip
    assert checkpoint_val_losses(run) == [(0, 8.0), (128, 5.0), (256, 4.1), (512, 3.6),
                                          (768, 3.4)]  # fmt: skip
    assert match_checkpoint(run, 4.0)[:2] == (256, 4.1)
    assert match_checkpoint(run, 3.45)[:2] == (768, 3.4)
    assert match_checkpoint(run, 3.5)[:2] == (512, 3.6)  # a tie goes to the earlier step
    assert match_checkpoint(run, 1.0)[:2] == (768, 3.4)
    assert match_checkpoint(run, 4.0, step=128)[:2] == (128, 5.0)  # pinned
    with pytest.raises(NnobsError, match="no checkpoint with a validation loss at step 999"):
        match_checkpoint(run, 4.0, step=999)
    with pytest.raises(NnobsError, match="no checkpoint with a validation loss to match"):
        match_checkpoint(tmp_path / "empty", 4.0)


# ------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def sparse_twin(python_run, python_corpus, tmp_path_factory):
    """The tiny run's weight-sparse twin: the same shape, tokens and data order, a quarter of
    every matrix kept."""
    from conftest import TINY_MODEL, tiny_train_config, torch_threads

    from nnobs.training.trainer import train

    out = tmp_path_factory.mktemp("runs") / "tiny-sparse"
    config = tiny_train_config(python_corpus, weight_keep=0.25, keep_anneal=(0.0, 0.5))
    with torch_threads(1):
        train(TINY_MODEL, config, out, progress=False)
    return out


TINY_ARGS = ["--tasks", ",".join(TINY_TASKS), "--target-loss", "0.75", "--steps", "20",
             "--batch", "16", "--n-train", "32", "--n-heldout", "16", "--n-boot", "200",
             "--no-progress"]  # fmt: skip


@pytest.mark.slow
def test_compare_command_end_to_end_and_resumed(python_run, sparse_twin, tmp_path, capsys):
    from nnobs.cli import main
    from nnobs.core.results import load_result

    out = tmp_path / "cmp"
    argv = ["circuits", "compare", "--dense", python_run, "--sparse", sparse_twin, "--out", out]
    assert main([str(a) for a in [*argv, *TINY_ARGS]]) == 0
    doc = load_result(out / "compare.json", "nnobs.circuits_compare")
    assert "geometric-mean ratio" in capsys.readouterr().out
    dense, sparse = doc["models"]["dense"], doc["models"]["sparse"]
    assert sparse["step"] == 24 and dense["step"] in (0, 8, 16, 24)
    gaps = {s: abs(v - sparse["val_loss"]) for s, v in doc["matching"]["dense_candidates"]}
    assert gaps[dense["step"]] == min(gaps.values())
    assert doc["matching"]["loss_gap"] == pytest.approx(dense["val_loss"] - sparse["val_loss"])
    assert sparse["totals"]["edges"]["total"] < dense["totals"]["edges"]["total"]
    both = [r for r in doc["tasks"] if r["dense"]["reached"] and r["sparse"]["reached"]]
    assert doc["headline"]["n_tasks"] == len(both)
    assert sorted(doc["excluded"]) == sorted(set(TINY_TASKS) - {r["task"] for r in both})
    for row in both:
        expected = np.log1p(row["dense"]["edges"]) - np.log1p(row["sparse"]["edges"])
        assert row["log_ratio"] == pytest.approx(expected)
    assert (out / "report" / "index.html").is_file()
    assert len(list((out / "sizes").rglob("*.json"))) == 2 * len(TINY_TASKS)
    stamps = {p: p.stat().st_mtime_ns for p in (out / "sizes").rglob("*.json")}
    assert main([str(a) for a in [*argv, *TINY_ARGS]]) == 0  # resumed: nothing pruned again
    assert {p: p.stat().st_mtime_ns for p in (out / "sizes").rglob("*.json")} == stamps
    again = load_result(out / "compare.json", "nnobs.circuits_compare")
    assert again["tasks"] == doc["tasks"] and again["headline"] == doc["headline"]


def test_compare_refuses_bad_input(python_run, tmp_path, expect_refusal):
    foreign = tmp_path / "foreign"  # the tiny run, as if trained with another tokenizer
    shutil.copytree(python_run, foreign)
    for meta_path in foreign.glob("checkpoints/*/meta.json"):
        meta = json.loads(meta_path.read_text())
        meta["tokenizer"]["fingerprint"] = "0123456789abcdef"
        meta_path.write_text(json.dumps(meta))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "routing.json").write_text(json.dumps({"schema": "nnobs.routing"}))
    out = tmp_path / "out"
    base = ["circuits", "compare", "--dense", python_run, "--sparse", python_run, *TINY_ARGS]
    rows = [
        ([*base, "--out", out, "--tasks", "quote"], "unknown Python task 'quote'"),
        ([*base, "--out", out, "--tasks", "lambda_func,lambda_func"], "named twice"),
        (["circuits", "compare", "--dense", foreign, "--sparse", python_run, "--out", out],
         "different tokenizers"),
        ([*base, "--out", out, "--tasks", "set_or_string"], "needs single-token answers"),
        ([*base, "--out", taken], "holds a nnobs.routing result"),
        ([*base, "--out", python_run], "is a training run"),
        ([*base, "--out", out, "--dense-step", "5"], "no checkpoint with a validation loss at"),
        ([*base, "--out", out, "--target-loss", "-1"], "target loss must be positive"),
    ]  # fmt: skip
    for argv, message in rows:
        expect_refusal(argv, message, watch=[out, taken, python_run])
