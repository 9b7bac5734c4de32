import json

import jsonschema
import numpy as np
import pytest
import torch
from conftest import tiny_gpt2_adapter

from nnobs.core.errors import NnobsError
from nnobs.core.results import schema_for, to_plain
from nnobs.data.tasks import load_task
from nnobs.data.tokenizer import byte_tokenizer
from nnobs.interventions.patching import (
    PatchSettings,
    Unit,
    patch_sweep,
    patch_sweep_arrays,
    patched_run,
    position_map,
    sweep_units,
)
from nnobs.models.adapter import nnobs_adapter
from nnobs.models.config import ModelConfig
from nnobs.models.transformer import Transformer
from nnobs.report.intervention_plots import patching_heatmap


@pytest.fixture(scope="module")
def adapter():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    return nnobs_adapter(Transformer(cfg).eval(), byte_tokenizer())


@pytest.fixture(scope="module")
def hf():
    return tiny_gpt2_adapter()


@pytest.fixture(scope="module")
def task(adapter):
    return load_task("paren", adapter.tokenizer, n=6)


def all_sites(adapter):
    return [s for s in adapter.sites if not s.endswith("attn_pattern")]


def run(adapter, ids):
    logits, _ = adapter.run_with_cache(torch.tensor([ids]), [])
    return logits[0]


@pytest.mark.parametrize("which", ["adapter", "hf"])
def test_patch_everything_gives_clean_and_nothing_gives_corrupted_exactly(which, request, task):
    model = request.getfixturevalue(which)
    every = [(Unit(site), None) for site in all_sites(model)]
    for i in range(len(task)):
        assert torch.equal(patched_run(model, task, i, every), run(model, task.clean[i]))
        assert torch.equal(patched_run(model, task, i, []), run(model, task.corrupted[i]))
        # And the reverse direction: corrupted activations into the clean run.
        back = patched_run(model, task, i, every, source="corrupted")
        assert torch.equal(back, run(model, task.corrupted[i]))


@pytest.mark.parametrize("which", ["adapter", "hf"])
def test_batched_sweep_equals_one_forward_pass_per_patch(which, request, task):
    model = request.getfixturevalue(which)
    units = sweep_units(model, "resid_pre") + sweep_units(model, "heads")
    units.append(Unit("blocks.1.mlp_hidden"))
    arrays = patch_sweep_arrays(model, task, units, PatchSettings(batch_size=7))
    assert arrays.patched.shape == (len(task), len(units), len(arrays.positions))
    assert not np.isnan(arrays.patched).any()
    for i in range(len(task)):
        length = len(task.corrupted[i])
        for u, unit in enumerate(units):
            for j, offset in enumerate(arrays.positions):
                position = length + offset if offset < 0 else offset
                logits = patched_run(model, task, i, [(unit, position)])
                expected = float(logits[-1, task.correct[i]] - logits[-1, task.incorrect[i]])
                assert arrays.patched[i, u, j] == pytest.approx(expected, abs=1e-5)


def test_whole_stream_patches_give_effect_one_and_reverse_zero(adapter, task):
    units = [Unit("embed"), Unit("blocks.1.resid_post"), Unit("final")]
    arrays = patch_sweep_arrays(adapter, task, units, PatchSettings(per_position=False))
    assert arrays.positions == [] and arrays.patched.shape == (len(task), 3, 1)
    np.testing.assert_allclose(
        arrays.patched[:, :, 0], arrays.clean[:, None].repeat(3, 1), atol=1e-5
    )
    back = patch_sweep_arrays(
        adapter, task, units, PatchSettings(per_position=False, source="corrupted")
    )
    np.testing.assert_allclose(
        back.patched[:, :, 0], back.corrupted[:, None].repeat(3, 1), atol=1e-5
    )


def test_layer_zero_effect_sits_on_the_one_differing_token(adapter, tmp_path):
    # Every item: the same length, the prompts differ only in the opening quote (position 4).
    quotes = [("'", '"'), ('"', "'")]
    items = [
        {"clean": f"v = {q}{w}", "corrupted": f"v = {o}{w}", "correct": q, "incorrect": o}
        for w in ("abc", "foo", "bar", "baz")
        for q, o in quotes
    ]
    path = tmp_path / "quote.jsonl"
    path.write_text("\n".join(json.dumps(i) for i in items))
    task = load_task(path, adapter.tokenizer)
    result = patch_sweep(adapter, task, ["resid_pre", "heads"], PatchSettings(n_boot=50))
    jsonschema.validate(to_plain(result), schema_for("nnobs.interventions"))
    resid = result["sweeps"][0]
    assert resid["positions"] == list(range(8))
    assert resid["position_labels"][4] == "'/\"" and resid["position_labels"][5] == "a"
    effect, patched = np.array(resid["effect"]), np.array(resid["patched_logit_diff"])
    base = result["baseline"]
    np.testing.assert_allclose(
        effect, (patched - base["corrupted_logit_diff"]) / base["gap"], rtol=1e-9
    )
    # Layer 0's input is the embedding: only the differing position can matter there, and
    # patching it restores the clean run completely.
    assert effect[0, 4] == pytest.approx(1.0, abs=1e-5)
    assert np.all(effect[0, [0, 1, 2, 3, 5, 6, 7]] == 0)
    assert np.all(effect[1, :4] == 0)  # causal: positions before the change never matter
    heads = result["sweeps"][1]
    assert heads["units"][:2] == ["blocks.0.head_out[0]", "blocks.0.head_out[1]"]
    assert np.array(heads["effect"]).shape == (8, 8)


def test_plot_reads_the_document(adapter, task, tmp_path):
    result = to_plain(patch_sweep(adapter, task, ["mlp_out"], PatchSettings(n_boot=20)))
    result = json.loads(json.dumps(result))  # what a reader of the JSON file sees
    path = patching_heatmap(result, result["sweeps"][0], tmp_path / "p.png")
    assert path.stat().st_size > 1000


def test_alignment_and_unequal_lengths(adapter, tmp_path):
    items = [
        {"clean": "ab(cd", "corrupted": "b[cd", "correct": ")", "incorrect": "]"},
        {"clean": "x(yz", "corrupted": "xy[yz", "correct": ")", "incorrect": "]"},
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(i) for i in items))
    with pytest.raises(
        NnobsError, match="clean prompt has 5 tokens but the corrupted prompt has 4"
    ):
        load_task(path, adapter.tokenizer)
    task = load_task(path, adapter.tokenizer, align="right")
    arrays = patch_sweep_arrays(adapter, task, [Unit("embed")])
    # End-aligned over the 4 positions every corrupted prompt has.
    assert arrays.positions == [-4, -3, -2, -1]
    assert not np.isnan(arrays.patched[0]).any()
    # Item 1's corrupted prompt is one token longer than its clean one; with right
    # alignment its first position has no clean counterpart, but the swept four all do.
    for j, offset in enumerate(arrays.positions):
        position = len(task.corrupted[1]) + offset
        logits = patched_run(adapter, task, 1, [(Unit("embed"), position)])
        assert arrays.patched[1, 0, j] == pytest.approx(
            float(logits[-1, task.correct[1]] - logits[-1, task.incorrect[1]]), abs=1e-5
        )
    assert position_map(5, 4, "right").tolist() == [-1, 0, 1, 2, 3]
    assert position_map(4, 5, "left").tolist() == [0, 1, 2, 3]
    with pytest.raises(NnobsError, match="cannot be patched position by position"):
        position_map(4, 5, None)


def test_bad_sweeps_are_clear_errors(adapter, task):
    with pytest.raises(NnobsError, match="unknown sweep"):
        sweep_units(adapter, "everything")
    with pytest.raises(NnobsError, match="head index 9 is out of range"):
        patch_sweep_arrays(adapter, task, [Unit("blocks.0.head_out", 9)])
    with pytest.raises(NnobsError, match="unknown hook site"):
        patch_sweep_arrays(adapter, task, [Unit("blocks.0.bogus")])
    with pytest.raises(NnobsError, match="patch head_out instead"):
        patch_sweep_arrays(adapter, task, [Unit("blocks.0.attn_pattern")])
    with pytest.raises(NnobsError, match="unknown patch source"):
        patch_sweep_arrays(adapter, task, [Unit("embed")], PatchSettings(source="both"))
