"""Routing verdicts on simulated data (planted effects found, nulls come out null) and the
analysis on tiny routed models, trained-like and wrapped."""

import numpy as np
import pytest
import torch

from nnobs.core.errors import NnobsError
from nnobs.core.results import to_plain, validate
from nnobs.data.windows import Windows
from nnobs.models.adapter import nnobs_adapter
from nnobs.models.config import ModelConfig
from nnobs.models.transformer import Transformer
from nnobs.routing.analysis import cell_edits, measure_routing, routing_cells
from nnobs.routing.result import RoutingSettings, analyse_model, routing_document
from nnobs.routing.verdicts import (
    dissociation,
    mass_without_effect,
    motifs,
    rank_correlation,
    replicate_means,
)
from nnobs.routing.wrap import recency_weights

BOOT = {"n_boot": 400, "seed": 0}


def simulated(true_mass, true_effect, n_docs=60, noise=0.01, seed=0):
    """Per-document mass and effect around the given cell means (documents × cells)."""
    rng = np.random.default_rng(seed)
    mass = np.clip(np.asarray(true_mass) + rng.normal(0, noise, (n_docs, len(true_mass))), 0, 1)
    effect = np.asarray(true_effect) + rng.normal(0, noise, (n_docs, len(true_effect)))
    return mass, effect


def test_rank_correlation_finds_a_planted_link_and_not_a_null():
    true_mass = np.linspace(0.05, 0.9, 8)
    mass, effect = simulated(true_mass, 0.1 * true_mass)
    planted = rank_correlation(mass, effect, **BOOT)
    assert planted["verdict"] == "tracks" and planted["ci95"][0] > 0.5
    mass, effect = simulated(true_mass, np.full(8, 0.02), noise=0.05)
    null = rank_correlation(mass, effect, **BOOT)
    assert null["verdict"] == "not shown" and null["ci95"][0] < 0 < null["ci95"][1]


def test_dissociation_and_mass_without_effect():
    names = ["a", "b", "c"]
    mass, effect = simulated([0.7, 0.2, 0.1], [0.0, 0.05, 0.01])
    (found,) = dissociation(mass, effect, [[0, 1, 2]], ["attn"], names, **BOOT)
    assert (found["largest_mass"], found["largest_effect"], found["verdict"]) == (
        "a", "b", "dissociates",
    )  # fmt: skip
    assert [m["cell"] for m in mass_without_effect(mass, effect, names, **BOOT)] == ["a"]
    mass, effect = simulated([0.7, 0.2, 0.05], [0.05, 0.0, 0.01])
    (same,) = dissociation(mass, effect, [[0, 1, 2]], ["attn"], names, **BOOT)
    assert same["verdict"] == "same cell"
    assert [m["cell"] for m in mass_without_effect(mass, effect, names, **BOOT)] == ["b"]


def test_motifs_name_the_family_a_sublayer_depends_on():
    keys = [("embedding", "mlp", "early"), ("current", "mlp", "early"),
            ("history", "attn", "late"), ("current", "attn", "late")]  # fmt: skip
    _, effect = simulated([0.5] * 4, [0.08, 0.01, 0.0, 0.0])
    result = motifs(effect, keys, ["early", "late"], **BOOT)
    early_mlp = next(d for d in result["depends_on"] if d["sublayer"] == "mlp")
    assert early_mlp["family"] == "embedding" and early_mlp["clear"]
    late_attn = next(d for d in result["depends_on"] if d["sublayer"] == "attn")
    assert not late_attn["clear"]  # two null families: no clear dependence
    status = {p["motif"]: p["status"] for p in result["published"]}
    assert status["embedding -> early mlp"] == "dominant"
    assert status["history -> late attn"] == "not shown"
    assert status["current -> early attn"] == "no such source"


def test_intervals_need_documents():
    with pytest.raises(NnobsError, match="at least 2 documents"):
        replicate_means(np.zeros((1, 3)), 10, 0)


# ----------------------------------------------------------------------- tiny models

CONFIG = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, d_mlp=48, max_seq_len=16)


def windows(n=12, length=12):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, (n, length + 1))
    return Windows(
        ids[:, :-1], ids[:, 1:], np.ones((n, length), bool), np.arange(n) // 2, np.zeros(n, int)
    )


def routed_adapter():
    model = Transformer(
        CONFIG.replace(residual="attnres", attnres_blocks=2),
        generator=torch.Generator().manual_seed(1),
    ).eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".query"):
                p.copy_(3 * torch.randn(p.shape, generator=gen))
    return nnobs_adapter(model)


def test_measures_are_the_edited_minus_the_plain_loss_per_document():
    adapter, data = routed_adapter(), windows()
    cells = routing_cells(adapter, 2)
    per_doc, stds = measure_routing(adapter, data, cells, batch_size=5)
    assert per_doc.shape == (6, len(cells), 5) and max(float(s.max()) for s in stds.values()) > 0
    cell = next(c for c in cells if (c.family, c.sublayer, c.band) == ("embedding", "mlp", "late"))
    ids, targets = torch.as_tensor(data.input_ids), torch.as_tensor(data.targets)
    with torch.no_grad():
        plain = torch.nn.functional.cross_entropy(
            adapter.forward(ids).transpose(1, 2), targets, reduction="none"
        )
        with adapter.hooks(edits=cell_edits(cell, "mask", {})):
            edited = torch.nn.functional.cross_entropy(
                adapter.forward(ids).transpose(1, 2), targets, reduction="none"
            )
    per_window = (edited - plain).mean(1).numpy()
    expected = per_window.reshape(6, 2).mean(1)  # two windows of equal length per document
    c = cells.index(cell)
    assert np.allclose(per_doc[:, c, 1], expected, atol=1e-6)
    assert np.abs(expected).max() > 1e-4  # the edit does something


def test_a_wrapped_model_has_fixed_weights_and_no_fix_effect():
    vanilla = nnobs_adapter(Transformer(CONFIG, generator=torch.Generator().manual_seed(1)).eval())
    settings = RoutingSettings(n_boot=100, wrap_blocks=2, bands=2)
    entry = analyse_model(vanilla, "vanilla", windows(), settings, progress=False)
    assert entry["routing"] == {"kind": "wrapped", "blocks": 2, "recency": 2.0}
    assert entry["wrap_check"]["max_logit_diff"] <= 1e-4
    assert entry["wrap_check"]["max_schedule_error"] <= 1e-6
    assert entry["max_weight_std"] <= 1e-6
    for cell in entry["cells"]:
        assert abs(cell["fix_loss"]) <= 1e-6 and cell["fix_kl"] <= 1e-6  # content-independent
    # Layers 2 and 3 (late band) route embed, block 0 (and the current block before the MLP).
    late_attn = {c["family"]: c["mass"] for c in entry["cells"] if c["band"] == "late"
                 and c["sublayer"] == "attn"}  # fmt: skip
    two, three = recency_weights(2), recency_weights(3)
    assert late_attn["embedding"] == pytest.approx(float(two[0] + three[0]) / 2, abs=1e-6)
    doc = routing_document([entry], settings, {"corpus": "synthetic"})
    validate(to_plain(doc))
