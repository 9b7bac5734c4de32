"""The seeding experiment: its settings refused before anything runs, its probe, its result
document and page, and (slow) the whole experiment end to end, resumed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nnobs.core.results import load_result, validate, write_result
from nnobs.report.seeding_page import render_seeding
from nnobs.seeding.analysis import analyse
from nnobs.seeding.config import load_seeding_config
from nnobs.seeding.experiment import COMPARISONS, CONDITIONS, QUESTION
from nnobs.seeding.probing import ridge_r2
from nnobs.training.schedule import checkpoint_steps


def test_bad_settings_are_refused_before_anything_is_written(tmp_path, expect_refusal):
    out = tmp_path / "out"
    base = ["seeding", "--preset", "tiny", "--out", out]
    bad_table = tmp_path / "bad.toml"
    bad_table.write_text("[seeding]\n[extra]\n")
    rows = [
        (["--set", "seeding.seeds=[0, 1, 2]"], "at least 5 distinct training seeds"),
        (["--set", "seeding.aux_layer=2"], "aux_layer=2 is out of range"),
        (["--set", 'seeding.attribute="colour"'], "unknown seeding.attribute"),
        (["--set", "seeding.aux_weight=0"], "seeding.aux_weight must be a number > 0"),
        (["--set", "large.model.n_layers=1"], "n_layers 1 < 2"),
        (["--set", "large.model.d_head=4"], "set model.d_head = 8"),
        (["--set", 'large.train.tokenizer="bpe"'], "must share tokenizer and data"),
        (["--set", "large.model.vocab_size=300"], "vocab_size"),
        (["--set", "seeding.probes=3"], "unknown seeding setting(s) probes"),
        (["--set", "medium.model.d_model=3"], "is not seeding.KEY=VALUE"),
    ]
    for extra, message in rows:
        expect_refusal([*base, *extra], message, watch=[tmp_path])
    expect_refusal(["seeding", "--preset", "nope", "--out", out], "unknown preset", [tmp_path])
    expect_refusal(
        ["seeding", "--config", bad_table, "--out", out], "unknown table(s) extra", [tmp_path]
    )


def test_ridge_r2_recovers_a_planted_linear_signal():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(4000, 16))
    signal = X @ rng.normal(size=16)
    y = signal + rng.normal(0, signal.std(), 4000)  # half the variance explained
    assert ridge_r2(X[:2000], y[:2000], X[2000:], y[2000:], 1.0) == pytest.approx(0.5, abs=0.04)
    noise = rng.normal(size=4000)
    assert ridge_r2(X[:2000], noise[:2000], X[2000:], noise[2000:], 1.0) < 0.01


def synthetic_document(persist: float) -> dict:
    """A seeding result built from simulated probe scores (no training): the seeded-with-aux
    condition carries a gap at layer 1 that decays to ``persist``."""
    config = load_seeding_config("tiny")
    steps = np.array(checkpoint_steps(400, 8, 64))
    rng = np.random.default_rng(1)
    base = 0.3 + rng.normal(0, 0.02, (5, 1, 3)) + 0.2 * (1 - np.exp(-steps / 80))[None, :, None]
    scores = {c: base + rng.normal(0, 0.005, base.shape) for c in CONDITIONS[2:]}
    scores["large_seeded_aux"][:, :, 1] += persist + 0.15 * np.exp(-steps / 60)
    conditions = {
        c: {
            "runs": [f"{c}/seed_{s}" for s in range(5)],
            "steps": steps.tolist(),
            "scores": scores.get(c, base).tolist(),
            "val_loss": np.full((5, len(steps)), 2.0).tolist(),
        }
        for c in CONDITIONS
    }
    return {
        "schema": "nnobs.seeding",
        "schema_version": 1,
        "nnobs_version": "test",
        "question": QUESTION,
        "config": config.to_dict(),
        "plan": {
            "decay_model": "exponential",
            "sensitivity_models": ["power", "late_mean"],
            "early_fraction": 0.1,
            "confidence": 0.95,
            "interval": "seed bootstrap",
            "verdict": "as declared",
            "primary": "seeded_aux_vs_random",
        },  # fmt: skip
        "attribute": "bracket_depth",
        "metric": "r2",
        "steps": steps.tolist(),
        "conditions": conditions,
        "comparisons": analyse(scores, steps, COMPARISONS, n_boot=500),
        "grown": [
            {
                "condition": "large_seeded_aux",
                "seed": 0,
                "run": "x",
                "layer_map": [0, 1],
                "max_logit_difference": 1e-7,
            }
        ],  # fmt: skip
        "wall_s": 1.0,
    }


def test_result_document_validates_and_the_page_shows_the_verdicts(tmp_path):
    doc = synthetic_document(persist=0.05)
    primary = doc["comparisons"]["seeded_aux_vs_random"]["layers"]
    assert [layer["verdict"] for layer in primary] == ["absent", "persists", "absent"]
    control = doc["comparisons"]["seeded_noaux_vs_random"]["layers"]
    assert all(layer["verdict"] != "persists" for layer in control)
    path = write_result(tmp_path / "seeding.json", doc)
    assert load_result(path, "nnobs.seeding")["comparisons"].keys() == COMPARISONS.keys()
    page = render_seeding(doc, tmp_path / "report").read_text()
    assert "layer 1: persists" in page and "the auxiliary task's doing" in page
    assert page.count("<figure") == 2 and (tmp_path / "report" / "gap.png").is_file()
    from nnobs.report.html import render_report  # nnobs report DIR renders it again

    (tmp_path / "report" / "index.html").unlink()
    assert render_report(tmp_path) == tmp_path / "report" / "index.html"
    decayed = synthetic_document(persist=0.0)
    assert decayed["comparisons"]["seeded_aux_vs_random"]["layers"][1]["verdict"] == "decays"
    broken = json.loads(json.dumps(doc))
    broken["comparisons"]["seeded_aux_vs_random"]["layers"][0]["verdict"] = "maybe"
    with pytest.raises(Exception, match="maybe"):
        validate(broken, "nnobs.seeding")


@pytest.mark.slow
def test_the_experiment_runs_end_to_end_and_resumes(python_corpus, tmp_path, capsys, one_thread):
    from nnobs.cli import main

    out = tmp_path / "seeding"
    argv = ["seeding", "--preset", "tiny", "--out", str(out),
            "--set", f"small.train.corpus={python_corpus}",
            "--set", f"large.train.corpus={python_corpus}",
            "--set", "small.train.max_chars=60000",
            "--set", "large.train.max_chars=60000",
            "--set", "seeding.probe_tokens=1500"]  # fmt: skip
    assert main(argv) == 0
    doc = load_result(out / "seeding.json", "nnobs.seeding")
    assert len(doc["grown"]) == 10
    assert max(g["max_logit_difference"] for g in doc["grown"]) <= 1e-5
    scores = np.array(doc["conditions"]["large_seeded_aux"]["scores"])
    assert scores.shape == (5, len(doc["steps"]), 3) and np.isfinite(scores).all()
    small = np.array(doc["conditions"]["small_aux"]["scores"])
    seeded = np.array(doc["conditions"]["large_seeded_aux"]["scores"])
    # At step 0 the grown model computes what its parent computed at the end: same probe.
    assert np.allclose(seeded[:, 0, :2], small[:, -1, :2], atol=1e-4)
    assert (out / "report" / "index.html").is_file()
    printed = capsys.readouterr().out
    assert "layer 0:" in printed
    # Re-running resumes: nothing is trained or probed again, the answer is the same.
    assert main(argv) == 0
    again = load_result(out / "seeding.json", "nnobs.seeding")
    assert again["comparisons"] == doc["comparisons"]
    assert again["wall_s"] < doc["wall_s"]
