"""The ``attnres`` residual: sources, routing, the route hook sites (read and edit), training."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_train_config, train_one_and_two_processes

from nnobs.core.errors import NnobsError
from nnobs.models.adapter import nnobs_adapter
from nnobs.models.attnres import source_names
from nnobs.models.config import ModelConfig
from nnobs.models.transformer import Transformer
from nnobs.routing.edits import fix_sources, mask_sources

CONFIG = ModelConfig(
    vocab_size=64, d_model=32, n_layers=4, n_heads=4, d_mlp=48, max_seq_len=16,
    residual="attnres", attnres_blocks=2,
)  # fmt: skip
IDS = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(0))
ROUTES = [f"blocks.{layer}.route_{s}" for layer in range(4) for s in ("attn", "mlp")]


def trained_like(config: ModelConfig = CONFIG) -> Transformer:
    """A routed model whose queries are not zero (routing depends on content)."""
    model = Transformer(config, generator=torch.Generator().manual_seed(1)).eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".query"):
                p.copy_(torch.randn(p.shape, generator=gen))
    return model


def test_sources_by_block_count():
    assert source_names(0, "attn", 4, 2) == ["embed"]
    assert source_names(0, "mlp", 4, 2) == ["embed", "current"]
    assert source_names(2, "attn", 4, 2) == ["embed", "block.0"]
    assert source_names(3, "mlp", 4, 2) == ["embed", "block.0", "current"]
    assert source_names(3, "attn", 4, 4) == ["embed", "block.0", "block.1", "block.2"]
    assert source_names(3, "mlp", 4, 1) == ["embed", "current"]  # one block: embed vs the rest


def test_routing_starts_uniform_and_has_the_documented_shape():
    adapter = nnobs_adapter(Transformer(CONFIG).eval())
    _, cache = adapter.run_with_cache(IDS, ROUTES)
    for site, weights in cache.items():
        layer, kind = int(site.split(".")[1]), site.rsplit("_", 1)[1]
        n = len(source_names(layer, kind, 4, 2))
        assert weights.shape == (3, 10, n)
        assert torch.allclose(weights, torch.full_like(weights, 1 / n)), site


def test_the_input_is_the_softmax_mix_of_normalised_sources():
    model = trained_like()
    adapter = nnobs_adapter(model)
    block = model.blocks[3]
    seen = {}
    handle = block.norm2.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    outs = [f"blocks.{layer}.{s}_out" for layer in range(4) for s in ("attn", "mlp")]
    _, cache = adapter.run_with_cache(IDS, ["embed", *outs, "blocks.3.route_mlp"])
    handle.remove()
    written = [cache["embed"], *(cache[o] for o in outs)]
    sources = torch.stack([written[0], sum(written[1:5]), sum(written[5:8])], dim=-2)
    router = block.residual.route_mlp
    keys = F.rms_norm(sources, (32,), router.gain, 1e-6)
    weights = (keys @ router.query).softmax(-1)
    assert torch.allclose(cache["blocks.3.route_mlp"], weights, atol=1e-6)
    assert weights.std(dim=(0, 1)).max() > 0.01  # content-dependent once trained
    expected = (weights.unsqueeze(-1) * sources).sum(-2)
    assert torch.allclose(seen["x"], expected, atol=1e-5)


def test_reading_a_route_site_leaves_the_output_unchanged():
    adapter = nnobs_adapter(trained_like())
    with torch.no_grad():
        plain = adapter.forward(IDS)
    logits, cache = adapter.run_with_cache(IDS, ROUTES)
    assert torch.equal(logits, plain) and len(cache) == 8


def test_masking_renormalises_the_softmax_over_the_other_sources():
    adapter = nnobs_adapter(trained_like())
    site = "blocks.3.route_mlp"
    plain, before = adapter.run_with_cache(IDS, [site])
    logits, after = adapter.run_with_cache(IDS, [site], edits={site: mask_sources([1], 3)})
    expected = before[site].clone()
    expected[..., 1] = 0
    expected /= expected.sum(-1, keepdim=True)
    assert torch.allclose(after[site], expected, atol=1e-7)
    assert after[site][..., 1].abs().max() == 0
    assert (logits - plain).abs().max() > 1e-3


def test_fixing_weights_sets_them_exactly_and_rescales_the_rest():
    adapter = nnobs_adapter(trained_like())
    site = "blocks.3.route_attn"  # sources: embed, block.0, current
    _, before = adapter.run_with_cache(IDS, [site])
    mean = before[site].mean(dim=(0, 1))
    _, fixed_all = adapter.run_with_cache(
        IDS, [site], edits={site: fix_sources([0, 1, 2], mean, 3)}
    )
    assert torch.allclose(fixed_all[site], mean.expand_as(fixed_all[site]), atol=1e-6)
    _, fixed_one = adapter.run_with_cache(IDS, [site], edits={site: fix_sources([0], [0.5], 3)})
    assert torch.allclose(fixed_one[site][..., 0], torch.tensor(0.5))
    assert torch.allclose(fixed_one[site].sum(-1), torch.tensor(1.0), atol=1e-6)
    ratio = fixed_one[site][..., 1] / fixed_one[site][..., 2]
    assert torch.allclose(ratio, before[site][..., 1] / before[site][..., 2], rtol=1e-5)


def test_bad_edits_and_configs_are_refused():
    with pytest.raises(NnobsError, match="leaves nothing to route"):
        mask_sources([0, 1, 2], 3)
    with pytest.raises(NnobsError, match="in 0..2"):
        mask_sources([3], 3)
    with pytest.raises(NnobsError, match="summing to 1"):
        fix_sources([0, 1], [0.2, 0.2], 2)
    with pytest.raises(NnobsError, match="does not divide n_layers=4"):
        CONFIG.replace(attnres_blocks=3)
    with pytest.raises(NnobsError, match="attnres_blocks must be an integer >= 1"):
        CONFIG.replace(attnres_blocks=0)
    with pytest.raises(NnobsError, match="residual is 'add'"):
        CONFIG.replace(residual="add")
    plain = nnobs_adapter(Transformer(CONFIG.replace(residual="add", attnres_blocks=None)))
    with pytest.raises(NnobsError, match="needs a routed residual.*residual is 'add'"):
        plain.resolve("blocks.1.route_attn")


def test_default_configs_are_stored_and_hashed_as_before():
    assert "attnres_blocks" not in ModelConfig().to_dict()
    assert ModelConfig().hash == ModelConfig.from_dict(ModelConfig().to_dict()).hash
    assert not any("residual" in name for name in Transformer(ModelConfig()).state_dict())
    assert CONFIG.to_dict()["attnres_blocks"] == 2 and CONFIG.routing_blocks == 2


def test_every_parameter_learns_and_the_state_round_trips():
    model = Transformer(CONFIG, generator=torch.Generator().manual_seed(0))
    loss, _ = model.training_loss(IDS[:, :-1], IDS[:, 1:])
    loss.backward()
    # Every parameter receives a gradient (data-parallel training needs it) and queries learn.
    assert all(p.grad is not None for p in model.parameters())
    queries = [p for name, p in model.named_parameters() if name.endswith(".query")]
    assert len(queries) == 7  # the first attention routes one source: nothing to learn
    assert all(q.grad.abs().max() > 0 for q in queries)
    copy = Transformer(CONFIG)
    copy.load_state_dict(model.state_dict())
    assert torch.equal(copy.eval()(IDS), model.eval()(IDS))


@pytest.mark.slow
def test_an_interrupted_routed_run_resumes_exactly(python_corpus, nnobs_cache, tmp_path):
    from nnobs.models.checkpoint import load_checkpoint
    from nnobs.training.trainer import train

    model = ModelConfig(
        vocab_size=257, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, residual="attnres"
    )
    settings = tiny_train_config(python_corpus, steps=16, checkpoint_every=8)
    train(model, settings, tmp_path / "full", progress=False)
    cut = tmp_path / "cut"
    train(model, settings, cut, progress=False)
    # As if killed while saving step 16: the run resumes from step 8.
    (cut / "checkpoints" / "step_000016").rename(cut / "checkpoints" / ".tmp-step_000016-x")
    result = train(model, settings, cut, progress=False)
    assert result.resumed_from == 8
    full, resumed = (load_checkpoint(tmp_path / d).model.state_dict() for d in ("full", "cut"))
    assert all(torch.equal(full[name], resumed[name]) for name in full)
    assert full["blocks.1.residual.route_attn.query"].abs().max() > 0  # routing was learned


@pytest.mark.slow
def test_a_routed_model_trains_data_parallel(tmp_path):

    from nnobs.core.rundir import read_metrics

    args = ["train", "--preset", "tiny", "--no-progress", "--set", "train.steps=20",
            "--set", "train.max_chars=60000", "--set", "train.device='cpu'",
            "--set", "model.residual='attnres'", "--set", "model.n_layers=4",
            "--set", "model.attnres_blocks=2"]  # fmt: skip
    one, two, done = train_one_and_two_processes(tmp_path, args)
    assert done.returncode == 0, done.stderr[-3000:]
    val_one, val_two = (read_metrics(d)[-1]["val_loss"] for d in (one, two))
    assert abs(val_one - val_two) < 1e-3, (val_one, val_two)


def test_route_sites_in_the_one_pass_capture():
    import numpy as np

    from nnobs.data.windows import Windows
    from nnobs.observe.capture import capture

    adapter = nnobs_adapter(trained_like())
    ids = IDS.numpy()
    windows = Windows(ids[:, :-1], ids[:, 1:], np.ones((3, 9), bool), np.arange(3), np.zeros(3))
    sites = ["blocks.3.route_mlp", "blocks.0.route_attn"]
    captured = capture(adapter, windows, sites, dtype=np.float32, progress=False)
    _, cache = adapter.run_with_cache(torch.as_tensor(ids[:, :-1]), sites)
    assert captured.acts["blocks.0.route_attn"].shape == (27, 1)
    assert np.allclose(
        captured.acts["blocks.3.route_mlp"], cache["blocks.3.route_mlp"].flatten(0, 1)
    )
