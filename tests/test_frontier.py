"""The frontier runner: the preset's grid, a micro frontier trained, scored and pruned end to end
and resumed after an interruption (the second call trains and prunes nothing), tasks a model
cannot reach left out of the geometric means, the result valid against its schema, the report
and its plot written, and bad input refused."""

import json
import shutil

import numpy as np
import pytest

import nnobs.circuits.sizes
from nnobs.circuits.frontier import _units, frontier_document, run_frontier
from nnobs.circuits.frontier_config import (
    load_frontier_config,
    matrix_params,
    parse_frontier,
)
from nnobs.cli import main
from nnobs.core.errors import NnobsError
from nnobs.core.results import load_result, validate
from nnobs.report.frontier_page import render_frontier
from nnobs.report.html import render_report

TASKS = ["while_return_true", "for_while"]


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread, nnobs_cache):
    pass


def micro(corpus, **frontier) -> dict:
    """Two 1-layer sparse models (width 16 and 32, the same L0), 16 steps, 2 tasks, a target
    loss every model reaches (above chance): the plumbing, not the science."""
    return {
        "frontier": {"name": "micro", "widths": [16, 32], "nonzero": [2000], "dense": False,
                     "tasks": TASKS, "target_loss": 2.0, "n_train": 32, "n_heldout": 16,
                     "prune_steps": 5, "eval_tokens": 4096, "n_boot": 200, **frontier},
        "model": {"vocab_size": 512, "d_model": 32, "n_layers": 1, "n_heads": 2, "d_head": 16,
                  "max_seq_len": 64, "norm": "rmsnorm", "tie_embeddings": False},
        "train": {"corpus": str(corpus), "tokenizer": "bpe_tasks", "seq_len": 64,
                  "batch_size": 8, "steps": 16, "warmup_steps": 2, "eval_every": 8,
                  "eval_batches": 2, "first_checkpoint": 8, "checkpoint_every": 16,
                  "device": "cpu"},
    }  # fmt: skip


def test_the_cpu_preset_holds_l0_fixed_across_widths(tmp_path):
    cfg = load_frontier_config("cpu")
    points = cfg.points()
    assert [p.name for p in points] == [
        "w64-dense", "w64-nz92160", "w64-nz46080", "w128-dense", "w128-nz92160", "w128-nz46080",
    ]  # fmt: skip
    for p in points:
        assert p.model.d_model == p.width and p.model.d_mlp == 4 * p.width
        assert p.model.n_heads * 16 == p.width and p.train.tokenizer == "bpe_tasks"
        if p.nonzero is not None:  # kept fraction × matrix weights = the same L0 at each width
            assert p.train.weight_keep * matrix_params(p.model) == pytest.approx(p.nonzero)
    assert points[1].keep == pytest.approx(0.25) and points[2].keep == pytest.approx(1 / 8)
    sparse = points[1].train  # the paper's optimiser, as in the `sparse` preset
    assert sparse.grad_rms_normalise and sparse.adam_eps == 0.1 and sparse.lr_keep_scaling
    assert len({(p.train.steps, p.train.data_seed, p.train.batch_size) for p in points}) == 1
    # the slowest (widest) models start first, so no job sits idle while one trains alone
    order = [(u.point.name, u.seed) for u in _units(cfg, tmp_path, "cpu", progress=False)]
    assert order == [(p.name, s) for p in points[3:] + points[:3] for s in cfg.seeds]
    assert cfg.seeds == [0, 1]  # initialisation variance is in the intervals


def to_toml(tables: dict) -> str:
    """Tables of scalars and lists as TOML (JSON's literals are TOML's)."""
    return "".join(
        f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items())
        for name, table in tables.items()
    )


def test_a_micro_frontier_resumes_after_an_interruption(
    python_corpus, tmp_path, monkeypatch, capsys
):
    cfg = parse_frontier(micro(python_corpus))
    out = tmp_path / "frontier"
    real = nnobs.circuits.sizes.circuit_sizes
    calls = []

    def interrupted(run, *args, **kwargs):  # Ctrl-C while pruning the second (narrow) model
        calls.append(run)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(run, *args, **kwargs)

    monkeypatch.setattr(nnobs.circuits.sizes, "circuit_sizes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_frontier(cfg, out)
    monkeypatch.setattr(nnobs.circuits.sizes, "circuit_sizes", real)
    assert not (out / "frontier.json").exists()
    narrow = out / "runs" / "w16-nz2000" / "seed_0" / "checkpoints"
    shutil.rmtree(narrow / "step_000016")  # and its training was cut short too
    wide = out / "runs" / "w32-nz2000" / "seed_0" / "checkpoints" / "step_000016"
    kept = (wide / "model.safetensors").stat().st_mtime_ns

    doc = run_frontier(cfg, out)
    assert doc == load_result(out / "frontier.json", "nnobs.frontier")
    runs = {p["name"]: p["runs"][0] for p in doc["points"]}
    assert (
        runs["w32-nz2000"]["status"] == "complete" and runs["w32-nz2000"]["tasks_pruned_now"] == []
    )
    assert runs["w16-nz2000"]["status"] == "resumed"
    assert runs["w16-nz2000"]["tasks_pruned_now"] == TASKS
    assert (wide / "model.safetensors").stat().st_mtime_ns == kept
    for p in doc["points"]:
        assert p["l0"] <= 2000 + p["n_params"] - p["matrix_params"]  # norms stay dense
        assert p["runs"][0]["step"] == 16 and p["not_reached"] == []
        assert p["loss"] > 0 and p["loss_ci"][0] < p["loss"] < p["loss_ci"][1]
    assert doc["tasks"]["common"] == TASKS
    assert [c["from"] for c in doc["claims"]["wider"]["comparisons"]] == ["w16-nz2000"]
    assert doc["claims"]["sparser"]["comparisons"] == []  # no two L0s at one width

    # a third call, from the command line, trains and prunes nothing
    config = tmp_path / "micro.toml"
    config.write_text(to_toml(micro(python_corpus)))
    assert main(["circuits", "frontier", "--config", str(config), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "w32-nz2000" in printed and "claim wider: inconclusive" in printed
    again = load_result(out / "frontier.json", "nnobs.frontier")
    assert {p["runs"][0]["status"] for p in again["points"]} == {"complete"}
    assert all(p["runs"][0]["tasks_pruned_now"] == [] for p in again["points"])
    assert [p["loss"] for p in again["points"]] == [p["loss"] for p in doc["points"]]

    page = render_report(out)  # what `nnobs report DIR` does with a frontier directory
    assert page == out / "report" / "index.html"
    assert (out / "report" / "frontier.png").stat().st_size > 10_000
    html = page.read_text()
    assert "w32-nz2000" in html and "Capability–interpretability frontier" in html

    other = parse_frontier(micro(python_corpus, target_loss=1.0))
    with pytest.raises(NnobsError, match="holds a different frontier"):
        run_frontier(other, out)


def fake_outcome(point: str, reached: dict[str, int | None], loss: float) -> dict:
    """What one unit returns, for a unit's model with these tasks' edges (None: not reached)."""
    rng = np.random.default_rng(len(point))
    tokens = [100] * 12
    return {
        "point": point, "seed": 0, "status": "trained", "tasks_pruned_now": [],
        "train_seconds": 1.0, "val_loss": loss,
        "loss": {"doc_ids": list(range(12)), "tokens": tokens, "loss": loss, "l0": 100,
                 "sums": (100 * (loss + rng.normal(0, 0.1, 12))).tolist(), "seconds": 0.5,
                 "settings": {"step": 16}},
        "sizes": {"tasks": {t: {"reached": e is not None, "edges": e, "nodes": e,
                                "full_loss": 0.1 if e is not None else 0.6,
                                "heldout_loss": 0.1 if e is not None else None, "seconds": 2.0}
                            for t, e in reached.items()}},
    }  # fmt: skip


def test_tasks_a_model_cannot_reach_are_reported_and_left_out(python_corpus):
    cfg = parse_frontier(micro(python_corpus, tasks=["for_while", "if_equals", "lambda_func"]))
    outcomes = {
        ("w16-nz2000", 0): fake_outcome(
            "w16-nz2000", {"for_while": 40, "if_equals": None, "lambda_func": 90}, 4.0
        ),
        ("w32-nz2000", 0): fake_outcome(
            "w32-nz2000", {"for_while": 10, "if_equals": 7, "lambda_func": 30}, 3.5
        ),
    }
    doc = frontier_document(cfg, outcomes, wall_s=1.0)
    validate(doc, "nnobs.frontier")
    assert doc["tasks"]["common"] == ["for_while", "lambda_func"]
    narrow, wide = doc["points"]
    assert narrow["not_reached"] == ["if_equals"] and wide["not_reached"] == []
    # geometric means over the common tasks only: sqrt(41 * 91) - 1 and sqrt(11 * 31) - 1
    assert narrow["geomean_edges"] == pytest.approx(np.sqrt(41 * 91) - 1)
    assert wide["geomean_edges"] == pytest.approx(np.sqrt(11 * 31) - 1)
    assert doc["claims"]["wider"]["comparisons"][0]["edges_ratio"] == pytest.approx(
        np.sqrt(11 * 31 / (41 * 91))
    )
    assert [p["pareto"] for p in doc["points"]] == [False, True]
    assert doc["timing"]["sizing_seconds"] == pytest.approx(2.0 * 6)  # reached or not


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"widths": [24]}, "width 24 is not a multiple of d_head 16"),
        ({"nonzero": [10**9]}, "is not below the"),
        ({"tasks": ["nope"]}, "unknown Python tasks ['nope']"),
        ({"tasks": []}, "frontier.tasks is empty"),
        ({"level": 0.7}, "frontier.level must be a number in (0, 0.5]"),
        ({"widths": [16], "dense": False}, "at least two grid points"),
        ({"colour": 1}, "unknown entries ['colour']"),
    ],
)
def test_config_mistakes_are_one_clear_error(python_corpus, change, message):
    with pytest.raises(NnobsError) as e:
        parse_frontier(micro(python_corpus, **change))
    assert message in str(e.value)


def test_bad_command_lines_are_refused(expect_refusal, tmp_path, python_corpus):
    (tmp_path / "bad.toml").write_text(
        '[frontier]\nwidths = 3\nnonzero = [9]\ntasks = ["for_while"]\n'
    )
    (tmp_path / "short.toml").write_text("[frontier]\nwidths = [16, 32]\n")
    for argv, message in [
        (["--preset", "huge"], "unknown frontier preset 'huge': choose one of cpu"),
        (["--config", tmp_path / "missing.toml"], "does not exist"),
        (["--config", tmp_path / "bad.toml"], "frontier.widths must be a list"),
        (["--config", tmp_path / "short.toml"], "lacks nonzero, tasks"),
        (["--preset", "cpu", "--jobs", "0"], "--jobs must be a positive integer"),
    ]:
        expect_refusal(
            ["circuits", "frontier", *argv, "--out", tmp_path / "out"], message, watch=[tmp_path]
        )


@pytest.mark.slow
def test_parallel_jobs_give_the_same_frontier(python_corpus, tmp_path):
    cfg = parse_frontier(micro(python_corpus))
    one = run_frontier(cfg, tmp_path / "one", jobs=1)
    two = run_frontier(cfg, tmp_path / "two", jobs=2)
    for a, b in zip(one["points"], two["points"], strict=True):
        assert a["loss"] == b["loss"] and a["l0"] == b["l0"]
        assert a["geomean_edges"] == b["geomean_edges"]
        assert a["runs"][0]["tasks"] == b["runs"][0]["tasks"]


def test_without_a_common_task_circuit_size_is_left_open(python_corpus, tmp_path):
    cfg = parse_frontier(micro(python_corpus, tasks=["for_while", "if_equals"]))
    outcomes = {
        ("w16-nz2000", 0): fake_outcome("w16-nz2000", {"for_while": 40, "if_equals": None}, 4.0),
        ("w32-nz2000", 0): fake_outcome("w32-nz2000", {"for_while": None, "if_equals": 7}, 3.5),
    }
    doc = frontier_document(cfg, outcomes, wall_s=1.0)
    validate(doc, "nnobs.frontier")
    assert doc["tasks"]["common"] == [] and doc["statistics"]["n_tasks"] == 0
    assert [p["geomean_edges"] for p in doc["points"]] == [None, None]
    assert [p["pareto"] for p in doc["points"]] == [False, False]
    wider = doc["claims"]["wider"]
    assert wider["edges_verdict"] == "inconclusive" and wider["loss_verdict"] == "supported"
    assert wider["comparisons"][0]["edges_ratio"] is None
    page = render_frontier(doc, tmp_path)  # loss against L0 drawn instead of the frontier
    assert (tmp_path / "frontier.png").stat().st_size > 10_000 and "against L0" in page.read_text()
