"""Studies: config parsing and presets, parameter matching, intervals, and a tiny study that
is interrupted and resumed without retraining what was finished."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from nnobs.core.errors import NnobsError
from nnobs.core.results import load_result
from nnobs.models.sizing import count_params
from nnobs.observe.study import run_study
from nnobs.observe.study_config import (
    load_study_config,
    parse_study,
    study_preset_names,
    variant_configs,
)
from nnobs.observe.study_summary import t_interval, welch_interval

FULL_PRESETS = {
    "residual", "norm", "bottleneck", "overparam", "activation", "depth_heads", "attention",
    "aux_supervision",
}  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread, nnobs_cache):
    pass


def tiny_study(corpus, **study) -> dict:
    return {
        "study": {"name": "tiny", "baseline": "pre", "seeds": [0, 1], **study},
        "model": {"vocab_size": 257, "d_model": 32, "n_layers": 2, "n_heads": 4,
                  "max_seq_len": 64},
        "train": {"corpus": str(corpus), "tokenizer": "byte", "seq_len": 64, "batch_size": 8,
                  "steps": 16, "lr": 1e-2, "warmup_steps": 4, "eval_every": 8,
                  "eval_batches": 2, "first_checkpoint": 8, "checkpoint_every": 16},
        "observe": {"ex_per_dim": 10, "doc_tokens": 64, "seeds": [43, 44], "n_boot": 50,
                    "random_heads": 20},
        "variants": [{"name": "pre"}, {"name": "post", "model": {"norm_placement": "post"}}],
    }  # fmt: skip


def assert_matched(cfg):
    configs = variant_configs(cfg)
    target = count_params(configs[cfg.baseline])
    for v in cfg.variants:
        n = count_params(configs[v.name])
        if (v.match_params_by or cfg.match_params_by) != "none":
            assert abs(n - target) / target <= 0.01, (cfg.name, v.name)
    return configs


def test_presets_parse_and_quick_is_matched():
    assert set(study_preset_names()) == FULL_PRESETS | {"quick", "routing"}
    for name in study_preset_names():
        cfg = load_study_config(name)
        assert cfg.name == name and cfg.question and len(cfg.seeds) == 3
        assert cfg.train.data_seed is None and cfg.data_seed == 0
    quick = load_study_config("quick")
    assert [v.name for v in quick.variants] == ["pre-norm", "post-norm", "no-residual"]
    assert_matched(quick)
    routing = assert_matched(load_study_config("routing"))
    assert [c.routing_blocks for c in routing.values() if c.residual == "attnres"] == [2, 4]


@pytest.mark.slow
def test_full_presets_are_matched_in_parameters():
    for name in sorted(FULL_PRESETS):
        configs = assert_matched(load_study_config(name))
        if name == "activation":  # SwiGLU pays for its gate with a narrower MLP
            assert configs["swiglu"].d_mlp < 4 * configs["gelu"].d_model
        if name == "overparam":  # the variable itself: not matched
            assert count_params(configs["width-1024"]) > 10 * count_params(configs["width-256"])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t["study"].update(baseline="nope"), "baseline 'nope' is not a variant"),
        (lambda t: t["variants"].append({"name": "pre"}), "unique"),
        (lambda t: t["variants"][1].update(colour="red"), "unknown entries"),
        (lambda t: t["variants"][1].update(model={"norm_placement": "middle"}), "norm_placement"),
        (lambda t: t["study"].update(match_params_by="depth"), "match_params_by"),
        (lambda t: t["study"].update(seeds=[0, 0]), "distinct"),
        (lambda t: t["study"].update(colour="red"), "unknown entries"),
        (lambda t: t["observe"].update(doc_tokens=0), "doc_tokens"),
        (lambda t: t.update(extra={}), "unexpected top-level"),
        (lambda t: t.update(variants=[{"name": "pre"}]), "at least two"),
    ],
)
def test_config_mistakes_are_one_clear_error(python_corpus, change, message):
    tables = tiny_study(python_corpus)
    change(tables)
    with pytest.raises(NnobsError, match=message):
        parse_study(tables)


def test_intervals_by_hand():
    lo, hi = t_interval([1.0, 2.0, 3.0])
    half = scipy_stats.t.ppf(0.975, 2) * 1.0 / np.sqrt(3)
    assert (lo, hi) == pytest.approx((2 - half, 2 + half))
    assert t_interval([1.0]) is None
    a, b = [0.30, 0.32, 0.35, 0.31], [0.10, 0.20, 0.15]
    reference = scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert welch_interval(a, b) == pytest.approx([reference.low, reference.high])
    assert welch_interval(a, [0.1]) is None


def test_a_study_resumes_without_retraining_finished_runs(python_corpus, tmp_path, monkeypatch):
    import nnobs.observe.trajectory

    cfg = parse_study(tiny_study(python_corpus))
    out = tmp_path / "study"
    real = nnobs.observe.trajectory.observe_run
    calls = []

    def interrupted(run_dir, **kwargs):  # Ctrl-C while observing the third run
        calls.append(run_dir)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(run_dir, **kwargs)

    monkeypatch.setattr(nnobs.observe.trajectory, "observe_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_study(cfg, out)
    monkeypatch.setattr(nnobs.observe.trajectory, "observe_run", real)
    runs = {(v, s): out / "runs" / v / f"seed_{s}" for v in ("pre", "post") for s in (0, 1)}
    assert not (out / "study.json").exists() and not runs[("post", 1)].exists()
    # The third run was also cut short while training: its last checkpoint is gone.
    import shutil

    shutil.rmtree(runs[("post", 0)] / "checkpoints" / "step_000016")
    finished = {
        key: (runs[key] / "checkpoints" / "step_000016" / "model.safetensors").stat().st_mtime_ns
        for key in [("pre", 0), ("pre", 1)]
    }

    doc = run_study(cfg, out)
    assert doc == load_result(out / "study.json")
    status = {(v["name"], r["seed"]): r["status"] for v in doc["variants"] for r in v["runs"]}
    assert status == {
        ("pre", 0): "complete", ("pre", 1): "complete",
        ("post", 0): "resumed", ("post", 1): "trained",
    }  # fmt: skip
    for key, mtime in finished.items():  # not retrained
        path = runs[key] / "checkpoints" / "step_000016" / "model.safetensors"
        assert path.stat().st_mtime_ns == mtime

    post = doc["variants"][1]
    assert post["n_params"] == count_params(variant_configs(cfg)["post"])
    assert sum(post["verdict_counts"].values()) == 2
    assert post["aggregate"]["steps"] == [0, 8, 16]
    finals = [r["final"]["pcorr"] for r in post["runs"]]
    assert post["final_pcorr"]["mean"] == pytest.approx(np.mean(finals))
    assert post["final_pcorr"]["ci95"] == pytest.approx(t_interval(finals))
    assert [e["metric"] for e in doc["effects"]] == [
        "final_pcorr", "final_oc_pcorr", "peak_pcorr", "final_val_loss"
    ]  # fmt: skip
    base = [r["final"]["pcorr"] for r in doc["variants"][0]["runs"]]
    assert doc["effects"][0]["difference"] == pytest.approx(np.mean(finals) - np.mean(base))
    assert doc["controls"]["data_order"].startswith("identical")

    # A third invocation reuses everything; a different study in the same place is refused.
    again = run_study(cfg, out)
    assert {r["status"] for v in again["variants"] for r in v["runs"]} == {"complete"}
    other = parse_study(tiny_study(python_corpus, seeds=[0, 1, 2]))
    with pytest.raises(NnobsError, match="holds a different study"):
        run_study(other, out)


@pytest.mark.slow
def test_parallel_jobs_give_the_same_study(python_corpus, tmp_path):
    cfg = parse_study(tiny_study(python_corpus))
    one = run_study(cfg, tmp_path / "one", jobs=1)
    two = run_study(cfg, tmp_path / "two", jobs=2)
    for a, b in zip(one["variants"], two["variants"], strict=True):
        assert [r["final"]["pcorr"] for r in a["runs"]] == [r["final"]["pcorr"] for r in b["runs"]]
