"""Observing every checkpoint of a run: shared windows, per-checkpoint records, the floor,
CKA to the last checkpoint, collapse wiring, reuse, shrinking and failures."""

import numpy as np
import pytest

from nnobs.core.errors import NnobsError
from nnobs.core.results import load_result, validate
from nnobs.data.corpus import load_corpus
from nnobs.observe.trajectory import TrajectoryObserver, TrajectorySettings, observe_run

# 320 tokens per split from documents of at most 64 tokens: seconds per checkpoint.
TINY = dict(ex_per_dim=10, doc_tokens=64, seeds=[43, 44], n_boot=50, random_heads=20)


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    pass


def settings(**changes) -> TrajectorySettings:
    return TrajectorySettings(**{**TINY, **changes})


@pytest.fixture(scope="module")
def trajectory(python_run):
    return observe_run(python_run, settings=settings(), progress=False)


def test_every_checkpoint_is_measured_on_the_same_tokens(trajectory, python_run):
    doc = load_result(python_run / "trajectory" / "trajectory.json")  # schema-valid on disk
    assert doc == trajectory
    records = doc["checkpoints"]
    assert [r["step"] for r in records] == [0, 8, 16, 24]
    assert all(r["status"] == "observed" for r in records)
    # One set of windows for the whole run: identical token counts at every checkpoint.
    assert {tuple(r["tokens"].values()) for r in records} == {(320, 320, 320)}
    assert doc["tokens"]["validation"]["tokens"] == 320
    assert doc["tokens"]["validation"]["documents"] >= 5  # the doc_tokens cap spreads them
    assert doc["split_policy"].startswith("model trained on this corpus")
    for r in records:
        assert [x["layer"] for x in r["layers"]] == [0, 1]
        for x in r["layers"]:
            # the validation pcorr lies inside its own cluster-bootstrap interval
            assert x["ci95"][0] < x["pcorr"] < x["ci95"][1]
        best = r["best"]
        assert best["layer"] == 0  # layer 1 is the last 20% of depth
        assert best["seeds"] == [43, 44] and len(best["per_seed"]) == 2
        assert best["mean"] == pytest.approx(np.mean(best["per_seed"]))
        assert len(r["random_head"]["abs_values"]) == 20
        assert r["val_loss"] is not None
    # Validation loss falls as the run trains.
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 0.5


def test_floor_cka_and_collapse_once_per_run(trajectory):
    doc = trajectory
    floor = doc["floor"]
    assert floor["source"] == "step 0 checkpoint"
    # The null is the step-0 (random-init) model's headline, measured like every checkpoint;
    # the floor adds its one-sided 95% normal quantile.
    best0 = doc["checkpoints"][0]["best"]
    assert (floor["null_value"], floor["null_sd"]) == (best0["ensemble"], best0["ensemble_sd"])
    assert floor["value"] == pytest.approx(best0["ensemble"] + 1.644854 * best0["ensemble_sd"])
    assert floor["random_init_per_layer"] == [x["pcorr"] for x in doc["checkpoints"][0]["layers"]]
    # CKA to the last checkpoint: exactly 1 for the last, below 1 before it.
    last = doc["checkpoints"][-1]["cka_to_final"]
    assert last == pytest.approx([1.0, 1.0])
    assert all(c < 0.99 for c in doc["checkpoints"][0]["cka_to_final"])
    cka = doc["cka"]
    assert cka["reference_step"] == 24 and cka["layers"] == [0, 1]
    assert np.allclose(np.diag(cka["matrix"]), 1.0)
    assert doc["collapse"]["steps"] == [0, 8, 16, 24]
    assert doc["collapse"]["verdict"] in (
        "retained", "erased", "never_formed", "fell_with_loss", "inconclusive"
    )  # fmt: skip
    # step 0 is judged by its own null: z = 0 there
    assert doc["collapse"]["headline"]["verdict"] == doc["collapse"]["verdict"]
    assert doc["loss_curve"][0]["step"] == 0 and len(doc["loss_curve"]) >= 4


def test_an_up_to_date_result_is_reused(trajectory, python_run, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a checkpoint was measured again")

    monkeypatch.setattr(TrajectoryObserver, "observe", fail)
    assert observe_run(python_run, settings=settings(), progress=False) == trajectory
    with pytest.raises(AssertionError, match="measured again"):  # other settings: recomputed
        observe_run(python_run, settings=settings(n_boot=60), progress=False)


def test_without_step_0_the_floor_comes_from_a_fresh_random_init(python_run, tmp_path):
    doc = observe_run(
        python_run, settings=settings(), steps=[8, 24], out_dir=tmp_path, progress=False
    )
    assert [r["step"] for r in doc["checkpoints"]] == [8, 24]
    assert doc["floor"]["source"] == "random_init_like(seed=0)"
    assert (tmp_path / "trajectory.json").is_file()
    with pytest.raises(NnobsError, match="no checkpoint at step"):
        observe_run(python_run, settings=settings(), steps=[5], out_dir=tmp_path)


def test_shrunk_skipped_and_failed_checkpoints_are_recorded(python_run, python_corpus):
    from nnobs.models.load import load_model

    corpus = load_corpus(str(python_corpus))
    with TrajectoryObserver(corpus, settings()) as observer:
        adapter = load_model(python_run, step=24)
        record = observer.observe(adapter, 24, fraction=0.5, note="half")
        assert record["status"] == "shrunk" and record["note"] == "half"
        assert 150 <= record["tokens"]["validation"] < 320  # a prefix of the windows
        observer.skip(16, "over budget")
        assert observer.records[16] == {
            "step": 16, "tokens_seen": None, "val_loss": None, "status": "skipped",
            "note": "over budget", "seconds": 0.0,
        }  # fmt: skip
        doc = observer.document([], mode="live")
        validate(doc)
        assert doc["floor"] is None and doc["collapse"] is None  # no random-init model yet
        with pytest.raises(NnobsError, match="fraction"):
            observer.observe(adapter, 8, fraction=0)

    # A budget the corpus cannot fill marks the checkpoint failed, with the reason.
    with TrajectoryObserver(corpus, settings(ex_per_dim=10_000)) as observer:
        record = observer.observe(load_model(python_run, step=0), 0)
        assert record["status"] == "failed" and "corpus too small" in record["note"]
        validate(observer.document([], mode="post_hoc"))


def _record(step, pcorr, val_loss, ci=0.01):
    """A measured checkpoint with given per-layer pcorr (and narrow CIs around it)."""
    layers = [
        {"layer": i, "site": f"blocks.{i}.resid_post", "pcorr": p, "ci95": [p - ci, p + ci],
         "spearman": p} for i, p in enumerate(pcorr)
    ]  # fmt: skip
    best = max(layers, key=lambda x: x["pcorr"])
    return {
        "step": step, "tokens_seen": step * 100, "val_loss": val_loss, "status": "observed",
        "fraction": 1.0, "note": None, "seconds": 1.0, "tokens": {"train": 100},
        "capture_val_loss": val_loss, "layers": layers,
        "best": {"layer": best["layer"], "site": best["site"], "split": "test", "seeds": [43],
                 "per_seed": [best["pcorr"]], "mean": best["pcorr"], "std": None,
                 "seed_agreement": 1.0, "ensemble": best["pcorr"],
                 "ensemble_ci95": best["ci95"]},
        "output_controlled": {"site": "x", "predictor_r2_test": 0.1, "ensemble": 0.0,
                              "ensemble_ci95": [0.0, 0.0]},
        "random_head": {"n": 3, "abs_q95": 0.02, "abs_values": [0.01, 0.02, 0.02]},
    }  # fmt: skip


@pytest.mark.parametrize(
    "series, verdict",
    [
        # Formed on layer 1, then fell back to the floor while the loss kept falling.
        ([[0.0, 0.01], [0.01, 0.30], [0.015, 0.25], [0.01, 0.02]], "erased"),
        # Formed and stayed.
        ([[0.0, 0.01], [0.05, 0.30], [0.04, 0.28], [0.03, 0.27]], "retained"),
    ],
)
def test_collapse_is_read_from_the_records(python_corpus, series, verdict):
    corpus = load_corpus(str(python_corpus))
    with TrajectoryObserver(corpus, settings()) as observer:
        for step, pcorr, loss in zip([0, 10, 20, 30], series, [5.0, 4.0, 3.5, 3.2], strict=True):
            observer.records[step] = _record(step, pcorr, loss)
        doc = observer.document([], mode="post_hoc")
    validate(doc)
    # the null is step 0's best layer: 0.01 with sd 0.01 / 1.96
    assert doc["floor"]["null_value"] == 0.01
    assert doc["floor"]["value"] == pytest.approx(0.01 + 1.644854 * 0.01 / 1.959964, rel=1e-5)
    assert doc["collapse"]["verdict"] == verdict
    assert doc["collapse"]["loss"] == "trainer validation loss"
    if verdict == "erased":
        assert doc["collapse"]["layer"] == 1 and doc["collapse"]["collapse_step"] == 30
        assert doc["collapse"]["peak_step"] == 10


def test_a_constant_layer_is_recorded_as_undefined_not_fatal():
    from nnobs.observe.capture import Capture
    from nnobs.observe.splits import SplitData
    from nnobs.observe.stages import layer_profile

    rng = np.random.default_rng(0)
    n = 400
    hidden = rng.standard_normal(n)
    loss = np.exp(rng.standard_normal(n)) + hidden
    acts = {
        "blocks.0.resid_post": (np.outer(hidden, np.ones(8)) + rng.standard_normal((n, 8))),
        "blocks.1.resid_post": np.ones((n, 8)),  # a collapsed representation
    }

    def split():
        cap = Capture(
            loss=loss, max_softmax=rng.uniform(0.1, 0.9, n), entropy=rng.uniform(0, 1, n),
            doc_ids=np.arange(n) // 20, acts={k: v.astype(np.float32) for k, v in acts.items()},
            norms={k: np.linalg.norm(v, axis=1) + rng.uniform(0, 1e-3, n) for k, v in acts.items()},
            stats={},
        )  # fmt: skip
        return SplitData("x", cap)

    rows = layer_profile(
        split(), split(), {0: "blocks.0.resid_post", 1: "blocks.1.resid_post"}, settings(), "cpu"
    )
    assert rows[0]["pcorr"] > 0.3 and rows[0]["ci95"][0] > 0.2
    assert rows[1]["pcorr"] is None and rows[1]["ci95"] is None and "constant" in rows[1]["note"]
