"""``nnobs bridge`` and ``nnobs bridge edit`` end to end on tiny runs, and their refusals:
models of other vocabularies or depths, a channel out of range, a bridge directory made from
other models (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_MODEL, file_snapshot, tiny_train_config, torch_threads

from nnobs.cli import main
from nnobs.core.results import load_result

FAST = ["--steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-windows", "6",
        "--n-boot", "50", "--checkpoint-every", "2", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def other_runs(python_corpus, nnobs_cache, tmp_path_factory) -> dict[str, Path]:
    """Two-step runs next to ``python_run``: other weights (same shape), another depth, another
    vocabulary."""
    from nnobs.training.trainer import train

    root = tmp_path_factory.mktemp("bridge-runs")
    shapes = {
        "reseeded": (TINY_MODEL, {"seed": 1}),
        "deeper": (TINY_MODEL.replace(n_layers=3), {}),
        "wider_vocab": (TINY_MODEL.replace(vocab_size=300), {}),
    }
    tc = {"steps": 2, "first_checkpoint": 2, "checkpoint_every": 2, "eval_every": 2}
    with torch_threads(1):
        for name, (model, changes) in shapes.items():
            train(model, tiny_train_config(python_corpus, **tc, **changes), root / name,
                  progress=False)  # fmt: skip
    return {name: root / name for name in shapes}


@pytest.fixture(scope="module")
def trained_bridge(python_run, other_runs, nnobs_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bridge") / "b"
    argv = ["bridge", "--dense", python_run, "--sparse", other_runs["reseeded"], "--out", out]
    with torch_threads(1):
        assert main([str(a) for a in [*argv, *FAST]]) == 0
    return out


def test_bridge_trains_reports_and_leaves_a_finished_directory_alone(
    trained_bridge, python_run, other_runs, capsys
):
    doc = load_result(trained_bridge / "bridge.json", "nnobs.bridge")
    assert [s["site"] for s in doc["sites"]] == [
        "blocks.0.resid_pre", "blocks.0.resid_mid", "blocks.1.resid_pre", "blocks.1.resid_mid",
    ]  # fmt: skip
    assert doc["shape"] == {"sites": [s["site"] for s in doc["sites"]], "d_dense": 32,
                            "d_sparse": 32, "k": 8}  # fmt: skip
    assert [row["step"] for row in doc["training_curve"]] == [4]  # logged every 10, and the last
    for site in doc["sites"]:
        lo, hi = site["nmse_encode"]["ci95"]
        assert lo <= site["nmse_encode"]["value"] <= hi and site["nmse_encode"]["value"] > 0
    assert (trained_bridge / "bridges.safetensors").is_file()
    assert (trained_bridge / "report" / "index.html").read_text().count("<tr>") == 5
    before = file_snapshot([trained_bridge])
    argv = ["bridge", "--dense", python_run, "--sparse", other_runs["reseeded"], "--out",
            trained_bridge, *FAST]  # fmt: skip
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 0
    assert "left alone" in capsys.readouterr().out
    assert file_snapshot([trained_bridge]) == before
    assert main(["report", str(trained_bridge), "--out", str(trained_bridge.parent / "r")]) == 0
    assert "NMSE encode" in (trained_bridge.parent / "r" / "index.html").read_text()


def test_bridge_edit_with_a_given_channel_writes_its_curve_test_and_page(trained_bridge, capsys):
    out = trained_bridge.parent / "edit"
    argv = ["bridge", "edit", "--bridge", trained_bridge, "--task", "single_double_quote",
            "--channel", "blocks.1.attn_in:3", "--n-items", "12", "--n-controls", "3",
            "--n-boot", "100", "--out", out, "--no-progress"]  # fmt: skip
    with torch_threads(1):
        assert main([str(a) for a in argv]) == 0
    doc = load_result(out / "edit.json", "nnobs.bridge_edit")
    assert doc["channel"]["site"] == "blocks.1.attn_in" and doc["channel"]["channel"] == 3
    assert [row["alpha"] for row in doc["curve"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert len(doc["controls"]) == 3 and 3 not in doc["controls"]
    assert doc["test"]["verdict"] in ("transfers", "no_transfer")
    assert doc["items"]["n_used"] + doc["items"]["n_left_out"] == doc["task"]["n_items"]
    assert (out / "index.html").is_file() and (out / "edit_curve.png").is_file()
    assert "beyond the random-channel control" in capsys.readouterr().out
    assert main(["report", str(out), "--out", str(out / "again")]) == 0  # nnobs report reads it
    assert "P(counterfactual answer)" in (out / "again" / "index.html").read_text()


def test_bridge_refusals(expect_refusal, trained_bridge, python_run, other_runs, tmp_path):
    new = tmp_path / "new"
    expect_refusal(
        ["bridge", "--dense", python_run, "--sparse", other_runs["deeper"], "--out", new],
        f"cannot bridge dense model {python_run} and sparse model {other_runs['deeper']}: they "
        "differ in depth 2 vs 3 layers",
        watch=[tmp_path],
    )
    line = expect_refusal(
        ["bridge", "--dense", other_runs["wider_vocab"], "--sparse", python_run, "--out", new],
        "vocabulary 300 vs 257 tokens",
        watch=[tmp_path],
    )
    assert str(other_runs["wider_vocab"]) in line and str(python_run) in line
    expect_refusal(
        ["bridge", "--dense", python_run, "--sparse", python_run, "--out", trained_bridge],
        "was made from other models",
        watch=[trained_bridge],
    )
    edit = ["bridge", "edit", "--bridge", trained_bridge, "--task", "single_double_quote"]
    expect_refusal([*edit, "--channel", "blocks.1.attn_in:32"], "index 32 is out of range 0..31",
                   watch=[trained_bridge])  # fmt: skip
    expect_refusal([*edit, "--channel", "blocks.1.resid_pre:3"], "not SITE:INDEX",
                   watch=[trained_bridge])  # fmt: skip
    expect_refusal([*edit, "--dense", other_runs["reseeded"], "--channel", "blocks.0.mlp_in:1"],
                   "was made from other models", watch=[trained_bridge])  # fmt: skip
    expect_refusal(["bridge", "edit", "--bridge", tmp_path, "--task", "single_double_quote"],
                   "bridge config", watch=[tmp_path])  # fmt: skip
    expect_refusal(["bridge", "--dense", python_run], "--sparse, --out required", watch=[tmp_path])


def test_the_bridge_directory_records_both_models(trained_bridge, python_run, other_runs):
    config = json.loads((trained_bridge / "config.json").read_text())
    assert config["dense"]["weights"] != config["sparse"]["weights"]
    assert Path(config["dense"]["path"]).parent.parent == python_run.resolve()
    assert Path(config["sparse"]["path"]).parent.parent == other_runs["reseeded"].resolve()
