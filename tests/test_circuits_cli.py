"""``nnobs circuits``: the parser with its actions, bad input refused in one line, and the
command end to end on a tiny trained run (result valid against its schema, graph as PNG and
SVG, report page)."""

from __future__ import annotations

import dataclasses
import json
import sys
import types

import pytest
from conftest import TINY_MODEL, tiny_train_config, torch_threads

from nnobs.cli import build_parser, circuits, main
from nnobs.core.results import load_result

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--steps", "30", "--batch", "16", "--n-train", "64", "--n-heldout", "32",
        "--n-check", "32", "--n-random", "19", "--level", "0.1", "--no-progress"]  # fmt: skip


def test_pruning_options_and_an_action_both_parse(monkeypatch):
    action = types.ModuleType("circuits_action_for_test")

    def register(actions):
        parser = actions.add_parser("compare")
        parser.add_argument("--out")
        parser.add_argument("--tasks")
        parser.set_defaults(func=lambda args: 7)

    action.register = register
    monkeypatch.setitem(sys.modules, action.__name__, action)
    monkeypatch.setattr(circuits, "CIRCUIT_ACTIONS", [action.__name__])
    parser = build_parser()
    plain = parser.parse_args(["circuits", "--model", "R", "--task", "with_as", "--out", "D",
                               "--target-loss", "0.1", "--ablation", "zero"])  # fmt: skip
    assert plain.action is None and plain.func is circuits.run
    assert (plain.model, plain.task, plain.out) == ("R", "with_as", "D")
    assert (plain.target_loss, plain.ablation, plain.steps) == (0.1, "zero", 500)
    compare = parser.parse_args(["circuits", "--no-progress", "compare", "--tasks", "a,b",
                                 "--out", "E"])  # fmt: skip
    assert compare.action == "compare" and compare.func(compare) == 7
    assert compare.no_progress and compare.tasks == "a,b" and compare.out == "E"


def test_without_model_task_and_out_nothing_is_pruned(expect_refusal, tmp_path):
    expect_refusal(["circuits", "--task", "with_as"], "needs --model, --out", [tmp_path])


@pytest.fixture(scope="module")
def flat_run(nnobs_cache, python_corpus, tmp_path_factory):
    """A tiny run whose blocks add nothing to a residual stream (residual = "none")."""
    from nnobs.training.trainer import train

    out = tmp_path_factory.mktemp("runs") / "flat"
    cfg = dataclasses.replace(TINY_MODEL, residual="none")
    with torch_threads(1):
        train(cfg, tiny_train_config(python_corpus, steps=2, first_checkpoint=2), out,
              progress=False)  # fmt: skip
    return out


def test_bad_input_is_refused_in_one_line(expect_refusal, python_run, flat_run, tmp_path):
    out = tmp_path / "out"
    base = ["circuits", "--model", python_run, "--out", out, *FAST]
    cases = [
        (["--task", "quotes"], "unknown task 'quotes': choose one of single_double_quote, "),
        (["--task", "with_as"], "needs single-token answers, and with this tokenizer ' as' is"),
        (["--task", "single_double_quote", "--target-loss", "0.001"],
         "above the target 0.001: no circuit can reach it"),
        (["--task", "single_double_quote", "--level", "0.01"], "cannot give p <= 0.01"),
        (["--task", "single_double_quote", "--n-check", "0"], "n_check must be at least 1"),
    ]  # fmt: skip
    for extra, message in cases:
        expect_refusal([*base, *extra], message, [tmp_path, python_run])
    flat = ["circuits", "--model", flat_run, "--task", "single_double_quote", "--out", out]
    expect_refusal(flat, "this model's residual is 'none'", [tmp_path, flat_run])
    other = tmp_path / "other"
    other.mkdir()
    (other / "routing.json").write_text(json.dumps({"schema": "nnobs.routing"}))
    argv = ["circuits", "--model", python_run, "--task", "single_double_quote", "--out", other]
    expect_refusal(argv, "holds a nnobs.routing result (routing.json)", [tmp_path])
    argv[-1] = python_run
    expect_refusal(argv, "is a training run", [tmp_path, python_run])


def test_a_foreign_model_has_no_node_sites():
    from conftest import tiny_gpt2_adapter

    from nnobs.circuits.find import check_model
    from nnobs.core.errors import NnobsError

    with pytest.raises(NnobsError, match="needs an nnobs Transformer"):
        check_model(tiny_gpt2_adapter())


def between_full_and_empty(run, task: str) -> float:
    """A target loss halfway between the tiny run's full-model loss and its loss with every
    node mean-ablated, on the items ``nnobs circuits`` bisects on (FAST's 32): the tiny model
    barely does the task, and this target still needs some nodes but not all."""
    from nnobs.circuits.checks import full_losses, item_losses_with
    from nnobs.circuits.find import CircuitSettings, task_items
    from nnobs.circuits.masks import node_means
    from nnobs.circuits.nodes import circuit_adapter, node_locations
    from nnobs.circuits.sizes import reference_windows
    from nnobs.models.load import load_model

    adapter = load_model(run)
    extended = circuit_adapter(adapter)
    locations = node_locations(extended)
    reference, _ = reference_windows(adapter, adapter.provenance["corpus_spec"])
    means = node_means(extended, locations, reference)
    items = task_items(adapter.tokenizer, task, CircuitSettings(n_heldout=32, n_check=32)).bisect
    full = float(full_losses(extended, items).mean())
    empty = float(item_losses_with(extended, locations, items, [], means).mean())
    assert full < empty
    return (full + empty) / 2


def test_circuits_end_to_end_on_a_tiny_run(python_run, nnobs_cache, tmp_path, capsys):
    target = between_full_and_empty(python_run, "single_double_quote")
    out = tmp_path / "quote"
    argv = ["circuits", "--model", str(python_run), "--task", "single_double_quote",
            "--out", str(out), "--target-loss", str(target), *FAST]  # fmt: skip
    with torch_threads(1):
        assert main(argv) == 0
    statement = capsys.readouterr().out.splitlines()[0]
    doc = load_result(out / "circuits.json", "nnobs.circuits")
    assert doc["verdict"]["statement"] == statement
    circuit = doc["circuit"]
    assert (
        0
        < circuit["n_nodes"]
        == len(circuit["nodes"])
        <= sum(circuit["model_nodes_by_kind"].values())
    )
    assert sum(circuit["nodes_by_kind"].values()) == circuit["n_nodes"]
    assert sum(circuit["edges_by_kind"].values()) == circuit["n_edges"]
    assert circuit["heldout_loss"] <= target
    assert doc["task"] == {**doc["task"], "n_train": 64, "n_bisect": 32, "n_check": 32}
    assert doc["checks"]["nonsense_control"]["train_curve"]
    assert doc["verdict"]["circuit_found"] == (not doc["verdict"]["failed"])
    assert (out / "circuit.png").read_bytes()[:4] == b"\x89PNG"
    assert b"<svg" in (out / "circuit.svg").read_bytes()[:2000]
    page = (out / "report" / "index.html").read_text()
    assert "fig-circuit" in page and "fig-bisection" in page
    assert statement.split(":")[0] in page
    # nnobs report renders the same page from the JSON alone.
    assert main(["report", str(out), "--out", str(tmp_path / "again")]) == 0
    assert "fig-circuit" in (tmp_path / "again" / "index.html").read_text()
    # A second run into the same directory replaces its own result.
    with torch_threads(1):
        assert main(argv + ["--no-control"]) == 0
    assert load_result(out / "circuits.json")["checks"]["nonsense_control"] is None


def test_patch_and_ablate_take_a_python_task(python_run, tmp_path, expect_refusal):
    task = ["--task", "single_double_quote", "--n-items", "8"]
    assert main(["ablate", "--model", str(python_run), "--site", "blocks.0.mlp_out", *task,
                 "--out", str(tmp_path / "ablate")]) == 0  # fmt: skip
    ablated = load_result(tmp_path / "ablate" / "ablate.json", "nnobs.interventions")
    assert ablated["task"]["name"] == "single_double_quote" and ablated["task"]["n_items"] == 8
    assert main(["patch", "--model", str(python_run), *task, "--no-progress",
                 "--out", str(tmp_path / "patch")]) == 0  # fmt: skip
    argv = ["ablate", "--model", python_run, "--site", "blocks.0.mlp_out", "--task", "with_as",
            "--out", tmp_path / "refused"]  # fmt: skip
    expect_refusal(argv, "' as' is ['", [tmp_path])
