"""The hook-site registry: the README's table, the model and the interventions all agree with it."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from nnobs.interventions.targets import position_axis
from nnobs.models.adapter import nnobs_adapter
from nnobs.models.config import ModelConfig
from nnobs.models.sites import LAYER_SITE_KINDS, ROUTE_SITE_KINDS, SITE_KINDS
from nnobs.models.transformer import Transformer

README = Path(__file__).resolve().parent.parent / "README.md"
CONFIG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_mlp=48, max_seq_len=16)


def readme_site_rows() -> list[tuple[str, str, str]]:
    """(site, meaning, shape) for each row of the README's hook-site table."""
    section = README.read_text().split("## Hook sites", 1)[1].split("\n## ", 1)[0]
    rows = [re.fullmatch(r"\| `([^`]+)` \| (.+) \| (.+) \|", line) for line in section.splitlines()]
    return [(m[1], m[2], m[3]) for m in rows if m]


def test_readme_table_lists_exactly_the_registry():
    rows = readme_site_rows()
    assert len(rows) == len({site for site, _, _ in rows})  # no site listed twice
    assert {site: (meaning, shape) for site, meaning, shape in rows} == {
        kind.pattern: (kind.meaning, kind.shape) for kind in SITE_KINDS.values()
    }


def test_model_sites_are_the_registry_kinds_in_forward_order():
    sites = list(Transformer(CONFIG).hook_points())
    expected = ["embed"]
    kinds = [kind for kind in LAYER_SITE_KINDS if kind not in ROUTE_SITE_KINDS]
    expected += [f"blocks.{layer}.{kind}" for layer in range(2) for kind in kinds]
    assert sites == [*expected, "final"]
    routed = list(Transformer(CONFIG.replace(residual="attnres")).hook_points())
    expected = ["embed"]
    expected += [f"blocks.{layer}.{kind}" for layer in range(2) for kind in LAYER_SITE_KINDS]
    assert routed == [*expected, "final"]


def test_activations_have_the_registry_shapes():
    sizes = {"batch": 3, "pos": 5, "d_model": 32, "heads": 4, "d_head": 8, "d_mlp": 48}
    adapter = nnobs_adapter(Transformer(CONFIG).eval())
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(0))
    _, cache = adapter.run_with_cache(ids, list(adapter.sites))
    for site, value in cache.items():
        kind = SITE_KINDS[site.rsplit(".", 1)[-1]]
        assert tuple(value.shape) == tuple(sizes[axis] for axis in kind.axes), site


def test_position_and_unit_axes():
    axes = {name: (kind.position_axis, kind.unit_axis) for name, kind in SITE_KINDS.items()}
    assert axes == {
        "embed": (1, None),
        "resid_pre": (1, None),
        "route_attn": (1, None),
        "attn_pattern": (2, 1),
        "head_out": (1, 2),
        "attn_out": (1, None),
        "resid_mid": (1, None),
        "route_mlp": (1, None),
        "mlp_hidden": (1, 2),
        "mlp_out": (1, None),
        "resid_post": (1, None),
        "final": (1, None),
    }
    assert [name for name, kind in SITE_KINDS.items() if not kind.per_token] == ["attn_pattern"]
    assert position_axis("blocks.1.attn_pattern") == 2 and position_axis("final") == 1
    assert position_axis("blocks.0.not_a_kind") == 1  # left for the adapter to refuse
