import json

import jsonschema
import pytest
import torch
from conftest import tiny_gpt2_adapter

from nnobs.core.errors import NnobsError
from nnobs.core.results import schema_for, to_plain
from nnobs.data.tasks import load_task
from nnobs.data.tokenizer import byte_tokenizer
from nnobs.interventions.attribution import (
    AttributionSettings,
    attribute,
    attribute_item,
    quadrature,
)
from nnobs.models.adapter import nnobs_adapter
from nnobs.models.config import ModelConfig
from nnobs.models.transformer import Transformer
from nnobs.report.intervention_plots import attribution_plot


def tiny(seed=0, **knobs):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, **knobs)
    return nnobs_adapter(Transformer(cfg).eval(), byte_tokenizer())


@pytest.fixture(scope="module")
def adapter():
    return tiny()


@pytest.fixture(scope="module")
def task(adapter):
    return load_task("paren", adapter.tokenizer, n=4)


@pytest.mark.parametrize("rule", ["gauss-legendre", "dyadic", "riemann", "trapezoid"])
def test_quadrature_rules_integrate_on_the_unit_interval(rule):
    nodes, weights = quadrature(rule, 98 if rule == "dyadic" else 64)
    assert weights.sum() == pytest.approx(1.0) and nodes.min() >= 0 and nodes.max() <= 1
    assert weights @ nodes**2 == pytest.approx(1 / 3, rel=1e-3)
    gl_nodes, gl_weights = quadrature("gauss-legendre", 3)
    assert gl_weights @ gl_nodes**5 == pytest.approx(1 / 6, rel=1e-12)  # exact to degree 5
    with pytest.raises(NnobsError, match="unknown quadrature rule"):
        quadrature("simpson", 4)


@pytest.mark.parametrize("site", ["embed", "blocks.1.head_out", "blocks.0.mlp_hidden"])
@pytest.mark.parametrize("baseline", ["zero", "corrupted"])
def test_integrated_gradients_is_complete_on_an_nnobs_model(adapter, task, site, baseline):
    for item in range(2):
        r = attribute_item(adapter, task, item, site, AttributionSettings(baseline=baseline))
        target = r["f_input"] - r["f_baseline"]
        assert r["complete"] and r["attribution_sum"] == pytest.approx(target, rel=0.01, abs=1e-5)
        assert len(r["per_position"]) == len(task.clean[item])
        assert sum(r["per_position"]) == pytest.approx(r["attribution_sum"], rel=1e-4, abs=1e-6)
    if site == "blocks.1.head_out":
        assert len(r["per_unit"]) == 4
        assert sum(r["per_unit"]) == pytest.approx(r["attribution_sum"], rel=1e-4, abs=1e-6)


def test_integrated_gradients_is_complete_on_a_tiny_hf_model():
    hf = tiny_gpt2_adapter()
    task = load_task("quote", hf.tokenizer, n=2, equal_length=False)
    result = attribute(hf, task, site="embed")
    completeness = result["completeness"]
    assert completeness["all_within_tol"] and completeness["max_rel_error"] <= 0.01
    result = attribute(hf, task, site="blocks.1.head_out", items=[0])
    assert result["completeness"]["all_within_tol"]


def test_steps_double_until_the_check_holds(adapter, task):
    # A ReLU model's integrand has kinks; a fixed small step count misses the tolerance
    # on this item, the adaptive schedule reaches it and reports how many steps it took.
    relu = tiny(seed=1, activation="relu")
    fixed = attribute_item(relu, task, 0, settings=AttributionSettings(steps=2, rule="riemann"))
    assert fixed["steps"] == 2 and not fixed["complete"]
    adaptive = attribute_item(relu, task, 0, settings=AttributionSettings(rule="riemann"))
    assert adaptive["complete"] and adaptive["steps"] > 2 and adaptive["rel_error"] <= 0.01


def test_zero_baseline_through_layernorms_needs_the_dyadic_rule():
    # With trained-size weights the metric along a path from a zero embedding changes on
    # every scale down to ~1e-12 (each LayerNorm near zero amplifies by 1/sqrt(eps)): one
    # Gauss-Legendre rule misses that even with 256 nodes, the dyadic rule needs 98.
    model = tiny(seed=0)
    with torch.no_grad():
        for p in model.model.parameters():
            if p.dim() > 1:
                p.mul_(5.0)
    task = load_task("paren", model.tokenizer, n=2)
    plain = attribute_item(
        model, task, 0, settings=AttributionSettings(rule="gauss-legendre", max_steps=256)
    )
    assert plain["rule"] == "gauss-legendre" and plain["steps"] == 256
    assert not plain["complete"] and plain["rel_error"] > 0.1
    auto = attribute_item(model, task, 0)
    assert auto["complete"] and auto["rule"] == "dyadic" and auto["rel_error"] <= 0.01
    nodes, weights = quadrature("dyadic", 2 * 49)
    assert nodes.min() < 1e-14 and weights.sum() == pytest.approx(1.0)


def test_gradient_times_input_is_exact_for_a_linear_readout():
    # Without norms the logits are linear in `final`: gradient × input is complete.
    adapter = tiny(seed=2, norm="none")
    task = load_task("paren", adapter.tokenizer, n=2)
    r = attribute_item(adapter, task, 0, "final", AttributionSettings(method="grad_x_input"))
    assert r["steps"] == 1 and r["rel_error"] < 1e-4
    # Only the last position feeds the logit difference.
    assert all(v == 0 for v in r["per_position"][:-1])
    # The input of a LayerNorm is read nearly scale-free (up to its epsilon): f(a x) ~ f(x),
    # so x . grad f(x) ~ 0 (Euler) and gradient × input sums to almost nothing although
    # f(x) - f(0) is not 0.
    layernorm = tiny(seed=2)
    r = attribute_item(
        layernorm, task, 0, "blocks.1.resid_post", AttributionSettings(method="grad_x_input")
    )
    assert abs(r["attribution_sum"]) < 0.05 * abs(r["f_input"] - r["f_baseline"])
    assert not r["complete"] and r["rel_error"] > 0.95


def test_result_document_and_plot(adapter, task, tmp_path):
    result = attribute(
        adapter, task, settings=AttributionSettings(baseline="corrupted"), items=[0, 1]
    )
    jsonschema.validate(to_plain(result), schema_for("nnobs.interventions"))
    assert result["settings"]["method"] == "ig" and len(result["items"]) == 2
    assert result["completeness"]["max_steps_used"] >= 16
    result = json.loads(json.dumps(to_plain(result)))
    assert attribution_plot(result, tmp_path / "a.png").stat().st_size > 1000


def test_bad_attribution_requests(adapter, task, tmp_path):
    with pytest.raises(NnobsError, match="unknown hook site"):
        attribute(adapter, task, site="blocks.0.nothing")
    with pytest.raises(NnobsError, match="unknown attribution method"):
        attribute(adapter, task, settings=AttributionSettings(method="saliency"))
    with pytest.raises(NnobsError, match="item 9 is out of range"):
        attribute(adapter, task, items=[9])
    with pytest.raises(NnobsError, match="choose a site with positions"):
        attribute(adapter, task, site="blocks.0.attn_pattern")
    item = {"clean": "f(ab", "corrupted": "f[abc", "correct": ")", "incorrect": "]"}
    (tmp_path / "t.jsonl").write_text(json.dumps(item))
    unequal = load_task(tmp_path / "t.jsonl", adapter.tokenizer, equal_length=False)
    with pytest.raises(
        NnobsError, match=r"corrupted baseline needs prompts of equal .* \(4 vs 5\)"
    ):
        attribute(adapter, unequal, settings=AttributionSettings(baseline="corrupted"))
    assert attribute(adapter, unequal)["completeness"]["all_within_tol"]
