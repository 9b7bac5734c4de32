from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from nnobs.core.errors import NnobsError
from nnobs.core.results import schema_for, to_plain
from nnobs.data.tasks import load_task
from nnobs.data.tokenizer import byte_tokenizer
from nnobs.data.windows import Windows, make_windows
from nnobs.interventions.ablation import AblationSettings, ablate, mean_activations
from nnobs.interventions.direction import (
    direction_intervention,
    fit_layer_probes,
    probe_from_observe,
)
from nnobs.interventions.targets import make_target, project_out, replace_edit, scale_edit
from nnobs.models.adapter import nnobs_adapter
from nnobs.models.config import ModelConfig
from nnobs.models.transformer import Transformer


def tiny(seed=0, **knobs):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, **knobs)
    return nnobs_adapter(Transformer(cfg).eval(), byte_tokenizer())


def windows(n=6, t=12, seed=1):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def as_windows(rows: torch.Tensor) -> Windows:
    """Each row as one document cut into one window: every token after its first is scored."""
    return make_windows(list(rows.numpy()), seq_len=rows.shape[1] - 1)


def valid(doc):
    jsonschema.validate(to_plain(doc), schema_for("nnobs.interventions"))


@pytest.fixture(scope="module")
def adapter():
    return tiny()


@pytest.fixture(scope="module")
def task(adapter):
    return load_task("paren", adapter.tokenizer, n=8, equal_length=False)


# ------------------------------------------------------------------------- targets, edits


def test_target_errors_name_the_problem(adapter):
    with pytest.raises(NnobsError, match="unknown hook site"):
        make_target(adapter, "blocks.0.nope")
    with pytest.raises(NnobsError, match="layer 5 is out of range"):
        make_target(adapter, "blocks.5.mlp_out")
    with pytest.raises(NnobsError, match=r"head index 4 is out of range: .* has 4 heads \(0..3\)"):
        make_target(adapter, "blocks.0.head_out", heads=[4])
    with pytest.raises(NnobsError, match="neuron index 128 is out of range"):
        make_target(adapter, "blocks.0.mlp_hidden", neurons=[128])
    with pytest.raises(NnobsError, match="heads apply to head_out"):
        make_target(adapter, "blocks.0.mlp_out", heads=[0])
    with pytest.raises(NnobsError, match="direction has 3 values but"):
        make_target(adapter, "blocks.0.resid_post", direction=[1.0, 0.0, 0.0])
    with pytest.raises(NnobsError, match="non-zero"):
        make_target(adapter, "blocks.0.resid_post", direction=np.zeros(32))
    target = make_target(adapter, "blocks.0.mlp_out", positions=[40])
    with pytest.raises(NnobsError, match="position 40 is out of range for prompts of 12"):
        adapter.run_with_cache(windows(), [], edits={target.site: replace_edit(target, 0.0)})


def test_edits_touch_exactly_the_target(adapter):
    x = torch.randn(2, 5, 4, 8)
    heads = make_target(adapter, "blocks.0.head_out", heads=[1, 3], positions=[-1])
    y = replace_edit(heads, 0.0)(x)
    changed = (y != x).any(-1)
    assert changed[:, 4][:, [1, 3]].all() and changed.sum() == 4
    assert (y[:, 4, [1, 3]] == 0).all()
    mean = torch.randn(4, 8)  # a mean has the trailing shape and broadcasts
    assert torch.equal(replace_edit(heads, mean)(x)[:, 4, 1], mean[1].expand(2, 8))
    doubled = scale_edit(heads, 2.0)(x)
    assert torch.equal(doubled[:, 4, 3], 2 * x[:, 4, 3]) and torch.equal(doubled[:, :4], x[:, :4])

    h = torch.randn(3, 6, 32)
    u = torch.randn(32)
    direction = make_target(adapter, "blocks.0.resid_post", direction=u)
    unit = u / u.norm()
    removed = project_out(direction)(h)
    assert (removed @ unit).abs().max() < 1e-5
    # Only the component along the direction changes.
    rest = h - (h @ unit)[..., None] * unit
    assert torch.allclose(removed, rest, atol=1e-5)
    tripled = scale_edit(direction, 3.0)(h)
    assert torch.allclose(tripled @ unit, 3 * (h @ unit), atol=1e-5)
    assert torch.allclose(tripled - (tripled @ unit)[..., None] * unit, rest, atol=1e-5)
    set_to = replace_edit(direction, 2.5 * unit)(h)
    assert torch.allclose(set_to @ unit, torch.full((3, 6), 2.5), atol=1e-5)


# ------------------------------------------------------------------------- ablation


def unused_mlp_model():
    """Layer 1's MLP writes nothing (zero output projection): mlp_out is exactly 0."""
    adapter = tiny(seed=2)
    with torch.no_grad():
        adapter.model.blocks[1].mlp.down.weight.zero_()
        adapter.model.blocks[0].attn.o_proj.weight[:, 8:16].zero_()  # head 1 of layer 0
    return adapter


@pytest.mark.parametrize("mode", ["zero", "mean", "resample"])
def test_ablating_an_unused_component_changes_nothing(mode, task, tmp_path):
    adapter = unused_mlp_model()
    for site, heads in [("blocks.1.mlp_out", None), ("blocks.0.head_out", [1])]:
        target = make_target(adapter, site, heads=heads)
        doc = ablate(
            adapter,
            target,
            mode,
            AblationSettings(n_boot=50),
            task=task,
            reference=windows(),
            cache_dir=tmp_path,
        )
        r = doc["ablation"]
        assert r["delta"] == 0.0 and r["per_example"]["base"] == r["per_example"]["ablated"]
        valid(doc)
    used = make_target(adapter, "blocks.0.head_out", heads=[0])
    assert (
        ablate(adapter, used, "zero", AblationSettings(n_boot=50), task=task)["ablation"]["delta"]
        != 0
    )


def test_ablating_a_used_component_changes_output_by_the_hand_computed_amount(task, tmp_path):
    # Without norms the logits are linear in the stream: removing the last MLP's output
    # changes the logit difference by exactly -(u_correct - u_incorrect) . mlp_out[last].
    adapter = tiny(seed=3, norm="none")
    unembed = adapter.model.unembed.weight.detach()
    target = make_target(adapter, "blocks.1.mlp_out")
    ref = windows(n=5, t=10, seed=7)
    means, _ = mean_activations(adapter, [target.site], ref, cache_dir=tmp_path)
    for mode, replacement in [("zero", torch.zeros(32)), ("mean", means[target.site])]:
        doc = ablate(
            adapter,
            target,
            mode,
            AblationSettings(n_boot=50),
            task=task,
            reference=ref,
            cache_dir=tmp_path,
        )
        per = doc["ablation"]["per_example"]
        for k, i in enumerate(per["index"]):
            ids = torch.tensor([task.clean[i]])
            _, cache = adapter.run_with_cache(ids, [target.site])
            out = cache[target.site][0, -1]
            direction = unembed[task.correct[i]] - unembed[task.incorrect[i]]
            expected = float(direction @ (replacement - out))
            assert per["ablated"][k] - per["base"][k] == pytest.approx(expected, abs=1e-4)


def test_loss_ablation_with_bootstrap_interval(adapter):
    target = make_target(adapter, "blocks.0.attn_out")
    doc = ablate(adapter, target, "zero", AblationSettings(n_boot=200), windows=windows())
    r = doc["ablation"]
    assert r["measure"] == "loss" and r["n_examples"] == 6
    deltas = np.array(r["per_example"]["ablated"]) - np.array(r["per_example"]["base"])
    assert r["delta"] == pytest.approx(deltas.mean())
    assert r["delta_ci95"][0] <= r["delta"] <= r["delta_ci95"][1]
    valid(doc)
    with pytest.raises(NnobsError, match="either a task"):
        ablate(adapter, make_target(adapter, "blocks.0.attn_out"))
    with pytest.raises(NnobsError, match="needs reference windows"):
        ablate(adapter, make_target(adapter, "blocks.0.attn_out"), "mean", windows=windows())
    with pytest.raises(NnobsError, match="unknown ablation mode"):
        ablate(adapter, make_target(adapter, "blocks.0.attn_out"), "shuffle", windows=windows())


def test_resample_replaces_with_another_example(adapter):
    w = windows(n=4)
    target = make_target(adapter, "embed")
    doc = ablate(adapter, target, "resample", AblationSettings(seed=5, n_boot=20), windows=w)
    # Replacing the whole embedding with another window's makes the model see that window:
    # each ablated loss is the loss of another window's predictions scored on this one's
    # targets, never this window's own.
    assert doc["ablation"]["n_examples"] == 4 and doc["ablation"]["delta"] != 0


# ------------------------------------------------------------------------- mean cache


def test_mean_cache_hits_and_invalidates(tmp_path):
    adapter = tiny(seed=4)
    ref = windows(n=4, t=8, seed=3)
    sites = ["blocks.0.mlp_out", "blocks.1.head_out"]
    means, info = mean_activations(adapter, sites, ref, cache_dir=tmp_path, reference_info={"x": 1})
    assert not info["hit"] and info["reference"]["n_tokens"] == 32
    _, cache = adapter.run_with_cache(ref, sites)
    assert torch.allclose(means[sites[0]], cache[sites[0]].mean(dim=(0, 1)), atol=1e-6)
    assert means[sites[1]].shape == (4, 8)
    again, info2 = mean_activations(adapter, sites, ref, cache_dir=tmp_path)
    assert info2["hit"] and info2["path"] == info["path"]
    assert torch.equal(again[sites[0]], means[sites[0]])

    # Ablation reads the cached file: plant a known mean there and see it used.
    planted = {**{s: v for s, v in again.items()}, sites[0]: torch.full((32,), 0.5)}
    save_file(planted, info["path"])
    target = make_target(adapter, sites[0])
    doc = ablate(adapter, target, "mean", windows=windows(), reference=ref, cache_dir=tmp_path)
    assert doc["mean_cache"]["hit"]
    zero_shift = ablate(adapter, target, "zero", windows=windows())["ablation"]["ablated"]
    assert doc["ablation"]["ablated"] != zero_shift
    _, check = mean_activations(adapter, [sites[0]], ref, cache_dir=tmp_path)
    assert check["hit"]

    # Another reference corpus (different tokens, or more of them) misses.
    assert not mean_activations(adapter, sites, windows(n=4, t=8, seed=9), cache_dir=tmp_path)[1][
        "hit"
    ]
    assert not mean_activations(adapter, sites, windows(n=5, t=8, seed=3), cache_dir=tmp_path)[1][
        "hit"
    ]
    # Changed weights miss too, even with the same config (e.g. another checkpoint).
    with torch.no_grad():
        adapter.model.blocks[0].mlp.up.weight[0, 0] += 1.0
    fresh, info3 = mean_activations(adapter, sites, ref, cache_dir=tmp_path)
    assert not info3["hit"] and info3["weights"] != info["weights"]
    assert not torch.equal(fresh[sites[0]], means[sites[0]])


@pytest.mark.parametrize("damage", ["meta missing", "meta corrupt", "means missing"])
def test_a_half_written_mean_cache_entry_is_rebuilt(tmp_path, damage):
    # A kill between the two files of an entry (as an older nnobs could leave one) once broke
    # every later mean ablation of the model: the entry now reads as absent and is rewritten.
    adapter = tiny(seed=4)
    ref = windows(n=4, t=8, seed=3)
    site = "blocks.0.mlp_out"
    means, info = mean_activations(adapter, [site], ref, cache_dir=tmp_path)
    entry = Path(info["path"]).parent
    {
        "meta missing": lambda: (entry / "meta.json").unlink(),
        "meta corrupt": lambda: (entry / "meta.json").write_text('{"sites": ['),
        "means missing": lambda: Path(info["path"]).unlink(),
    }[damage]()
    target = make_target(adapter, site)
    doc = ablate(adapter, target, "mean", windows=windows(), reference=ref, cache_dir=tmp_path)
    assert not doc["mean_cache"]["hit"] and doc["mean_cache"]["path"] == info["path"]
    again, hit = mean_activations(adapter, [site], ref, cache_dir=tmp_path)
    assert hit["hit"] and torch.equal(again[site], means[site])
    assert sorted(p.name for p in tmp_path.iterdir()) == [entry.name]  # no temporary left


# ------------------------------------------------------------------------- direction test


def test_direction_intervention_project_out_and_scale(adapter):
    rng = np.random.default_rng(0)
    direction = rng.normal(size=32)
    w = windows(n=6, t=16, seed=11)
    doc = direction_intervention(adapter, 0, direction, as_windows(w), AblationSettings(n_boot=100))
    d = doc["direction"]
    assert d["component"]["before"] > 0.01 and d["component"]["after"] < 1e-5
    assert d["loss"]["delta"] != 0 and d["later_layers"] == []
    valid(doc)
    same = direction_intervention(
        adapter, 0, direction, as_windows(w), AblationSettings(n_boot=20), mode="scale", factor=1.0
    )
    assert same["direction"]["loss"]["delta"] == 0.0
    assert same["direction"]["max_softmax"]["delta"] == 0.0
    with pytest.raises(NnobsError, match="unknown direction mode"):
        direction_intervention(adapter, 0, direction, as_windows(w), mode="rotate")


def test_direction_intervention_reports_later_layer_signal(adapter):
    ref, w = windows(n=8, t=24, seed=12), windows(n=8, t=24, seed=13)
    probes = fit_layer_probes(adapter, [1], as_windows(ref))
    assert probes[1].shape == (32,) and np.linalg.norm(probes[1]) == pytest.approx(1.0)
    direction = np.random.default_rng(1).normal(size=32)
    doc = direction_intervention(
        adapter, 0, direction, as_windows(w), AblationSettings(n_boot=20), probes=probes
    )
    (row,) = doc["direction"]["later_layers"]
    assert row["layer"] == 1
    # Each reported pcorr is the protocol's statistic of the layer-1 probe on these windows,
    # without and with the direction projected out at layer 0: recompute both from the model.
    from nnobs.measure.stats import partial_spearman

    removed = project_out(make_target(adapter, "blocks.0.resid_post", direction=direction))
    for key, edits in (("pcorr_before", {}), ("pcorr_after", {"blocks.0.resid_post": removed})):
        logits, cache = adapter.run_with_cache(w, ["blocks.1.resid_post"], edits=edits)
        logits = logits[:, :-1].float().flatten(0, 1)
        loss = torch.nn.functional.cross_entropy(logits, w[:, 1:].flatten(), reduction="none")
        h = cache["blocks.1.resid_post"][:, :-1].float().flatten(0, 1).numpy()
        covariates = np.column_stack([logits.softmax(-1).amax(-1), np.linalg.norm(h, axis=1)])
        expected = partial_spearman(h @ probes[1], loss.numpy(), covariates)
        assert row[key] == pytest.approx(expected, abs=1e-6)
    assert row["pcorr_before"] != row["pcorr_after"]
    with pytest.raises(NnobsError, match="not after the intervention layer"):
        direction_intervention(adapter, 1, direction, as_windows(w), probes=probes)


def test_probe_from_observe_reads_the_layer_and_direction():
    layer, direction = probe_from_observe({"probe": {"layer": 3, "direction": [0.6, 0.8]}})
    assert layer == 3 and direction.tolist() == [0.6, 0.8]
    with pytest.raises(NnobsError, match="no probe direction"):
        probe_from_observe({"sweep": []})


# ------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from nnobs.training.checkpoint import save_checkpoint

    adapter = tiny(seed=6)
    meta = {"tokenizer": byte_tokenizer().reference()}
    return save_checkpoint(tmp_path_factory.mktemp("run"), 1, adapter.model, meta)


def cli(*argv):
    from nnobs.cli import main

    return main([str(a) for a in argv])


def test_cli_patch_ablate_attribute_write_valid_results(run_dir, tmp_path, capsys):
    from nnobs.core.results import load_result

    out = tmp_path / "out"
    common = ["--model", run_dir, "--out", out]
    assert (
        cli(
            "patch",
            *common,
            "--task",
            "paren",
            "--n-items",
            4,
            "--sweep",
            "resid_pre",
            "--sweep",
            "heads",
            "--all-positions",
            "--no-progress",
        )
        == 0
    )
    doc = load_result(out / "patch.json")
    assert [s["name"] for s in doc["sweeps"]] == ["resid_pre", "heads"]
    assert doc["provenance"]["step"] == 1 and doc["task"]["n_items"] == 4
    assert (out / "patch_resid_pre.png").stat().st_size > 1000
    assert (out / "patch_heads.png").is_file()

    assert (
        cli(
            "ablate",
            *common,
            "--site",
            "blocks.0.head_out",
            "--heads",
            "1,2",
            "--task",
            "quote",
            "--n-items",
            6,
            "--n-boot",
            50,
        )
        == 0
    )
    doc = load_result(out / "ablate.json")
    assert doc["ablation"]["target"]["heads"] == [1, 2]
    assert doc["ablation"]["measure"] == "logit_diff"

    assert cli("attribute", *common, "--task", "bracket", "--items", 2) == 0
    doc = load_result(out / "attribute.json")
    assert len(doc["items"]) == 2 and doc["completeness"]["all_within_tol"]
    assert (out / "attribute.png").stat().st_size > 1000
    assert "completeness gap at most" in capsys.readouterr().out


def test_cli_bad_input_is_one_line(run_dir, tmp_path, capsys):
    common = ["--model", run_dir, "--out", tmp_path]
    (tmp_path / "empty.jsonl").write_text("")
    cases = [
        (["patch", "--task", tmp_path / "empty.jsonl"], "has no items"),
        (["patch", "--task", "loop"], "' in' tokenises to"),
        (["ablate", "--site", "blocks.0.nope", "--task", "quote"], "unknown hook site"),
        (
            ["ablate", "--site", "blocks.0.head_out", "--heads", "7", "--task", "quote"],
            "head index 7 is out of range",
        ),
        (["ablate", "--task", "quote"], "give --site"),
        (["attribute", "--task", "quote", "--site", "blocks.9.mlp_out"], "layer 9 is out of"),
    ]
    for argv, message in cases:
        assert cli(*argv, *common) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err
