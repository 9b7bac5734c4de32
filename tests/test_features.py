"""Feature sources, SAEs (training, SAELens format) and the streamed dashboards."""

import json
import shutil
import subprocess
from dataclasses import replace

import numpy as np
import pytest
import torch

from nnobs.core.errors import NnobsError
from nnobs.core.results import load_result
from nnobs.data.windows import make_windows
from nnobs.features.dashboard import BestEntries, DashboardSettings, feature_dashboards
from nnobs.features.sae import SparseAutoencoder, load_sae
from nnobs.features.sources import DirectionSource, direct_logits, neuron_source
from nnobs.features.stream import site_batches
from nnobs.features.train_sae import SAESettings, TopKSAETrainer
from nnobs.models.load import load_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread, nnobs_cache):
    pass


def _random_sae(site="blocks.1.resid_post", d_in=8, d_sae=24, k=3, seed=0):
    torch.manual_seed(seed)
    sae = SparseAutoencoder(d_in, d_sae, k, site=site)
    for p in sae.parameters():
        p.data.normal_()
    return sae


def test_sae_directory_round_trip_keeps_the_function(tmp_path):
    sae = _random_sae()
    loaded = load_sae(sae.save(tmp_path / "sae"))
    x = torch.randn(50, 8)
    assert loaded.site == "blocks.1.resid_post" and loaded.k == 3
    assert torch.equal(loaded(x), sae(x))
    assert ((sae.encode(x) > 0).sum(1) <= 3).all()
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert {cfg[k] for k in ("architecture", "d_in", "d_sae", "k")} == {"topk", 8, 24, 3}


def test_saelens_reads_what_nnobs_writes_and_back(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sae = _random_sae()
    sae.save(tmp_path / "ours")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "ours"))
    x = torch.randn(40, 8)
    assert torch.allclose(theirs.encode(x), sae.encode(x), atol=1e-6)
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    theirs.save_model(str(tmp_path / "theirs"))
    back = load_sae(tmp_path / "theirs")
    assert back.site == "blocks.1.resid_post"
    assert torch.allclose(back(x), sae(x), atol=1e-6)


def test_older_flat_saelens_layout_loads(tmp_path):
    sae = _random_sae()
    sae.save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    flat = {"d_in": 8, "d_sae": 24, "hook_name": cfg["metadata"]["hook_name"],
            "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3}}  # fmt: skip
    (tmp_path / "cfg.json").write_text(json.dumps(flat))
    x = torch.randn(10, 8)
    assert torch.equal(load_sae(tmp_path)(x), sae(x))
    (tmp_path / "cfg.json").write_text(json.dumps({**flat, "d_sae": 25}))
    with pytest.raises(NnobsError, match="W_enc is"):
        load_sae(tmp_path)


def _planted(n, d=16, n_true=32, active=2, seed=0):
    """Rows that are sums of ``active`` of ``n_true`` unit directions (the same for every
    seed) with random sizes."""
    truth = np.random.default_rng(99).normal(size=(n_true, d))
    truth /= np.linalg.norm(truth, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    codes = np.zeros((n, n_true))
    for i in range(n):
        codes[i, rng.choice(n_true, active, replace=False)] = rng.uniform(1, 3, active)
    return torch.tensor(codes @ truth, dtype=torch.float32), truth


def _fit(rows, k, **changes):
    settings = SAESettings(d_sae=64, k=k, tokens=len(rows), batch_tokens=256,
                           buffer_tokens=4096, dead_tokens=4096, **changes)  # fmt: skip
    return TopKSAETrainer(settings, "blocks.0.resid_post").fit(rows.split(1000))


def test_sae_recovers_planted_features_and_explains_little_noise():
    rows, truth = _planted(120_000)
    trainer = _fit(rows, k=2)
    held, _ = _planted(4000, seed=1)
    recon = trainer.sae_(held)
    explained = 1 - ((recon - held) ** 2).sum() / ((held - held.mean(0)) ** 2).sum()
    assert explained > 0.9
    cos = truth @ trainer.sae_.W_dec.detach().numpy().T
    assert np.median(cos.max(1)) > 0.95  # most planted directions have a decoder row
    noise = torch.randn(60_000, 16)
    null = _fit(noise, k=2).sae_
    test = torch.randn(4000, 16)
    null_explained = 1 - ((null(test) - test) ** 2).sum() / ((test - test.mean(0)) ** 2).sum()
    # Two of 64 directions hold only part of isotropic noise (about half in 16 dimensions).
    assert null_explained < 0.6 and null_explained < explained - 0.3


def test_auxiliary_loss_trains_features_that_stopped_firing():
    rows, _ = _planted(2048, seed=2)
    changed = {}
    for aux in (1 / 32, 0.0):
        trainer = _fit(rows[:256], k=2, aux_coef=aux)
        sae = trainer.sae_.requires_grad_(True)
        pre = sae.pre_activations(rows[256:272]).detach()
        silent = (sae.activate(pre) == 0).all(0)  # never in the top k on this batch
        assert silent.sum() > 10
        trainer.silent_ = torch.where(silent, trainer.settings.dead_tokens, 0)
        trainer.partial_fit(rows[256:272])  # leaves this step's gradient in .grad
        changed[aux] = sae.W_enc.grad[:, silent].abs().sum().item()
    assert changed[1 / 32] > 0 and changed[0.0] == 0.0  # only the auxiliary loss reaches them


def test_resampling_restarts_dead_features_on_badly_reconstructed_rows():
    rows, _ = _planted(4096, seed=3)
    trainer = _fit(rows[:1024], k=2)
    sae = trainer.sae_
    trainer.settings = replace(trainer.settings, tokens=10**6, dead_tokens=512)  # resample due
    dead = torch.tensor([3, 10, 40])
    trainer.silent_ = torch.zeros(64, dtype=torch.long)
    trainer.silent_[dead] = 512
    x = rows[1024:1280]
    with torch.no_grad():
        recon = sae(x)
    before = sae.W_dec.detach().clone()
    trainer._resample(x, recon)
    assert trainer.resampled_ == 3 and (trainer.silent_[dead] == 0).all()
    missed = torch.nn.functional.normalize(x - recon, dim=1)
    cos = sae.W_dec.detach()[dead] @ missed.T
    assert torch.allclose(cos.max(1).values, torch.ones(3), atol=1e-5)  # a missed row each
    others = torch.ones(64, dtype=torch.bool)
    others[dead] = False
    assert torch.equal(sae.W_dec.detach()[others], before[others])  # the live ones untouched


def test_best_entries_equal_the_global_top_k():
    rng = np.random.default_rng(0)
    scores = torch.tensor(rng.normal(size=(5, 1000)), dtype=torch.float32)
    table = BestEntries(5, 7, 1)
    for chunk in range(0, 1000, 64):
        part = scores[:, chunk : chunk + 64]
        where = torch.arange(chunk, chunk + part.shape[1]).expand(5, -1)
        where = torch.stack([where, where], -1)
        table.offer(part, part, where, part[..., None], where[..., :1])
    best = scores.topk(7, dim=1)
    assert torch.equal(table.score.sort(1, descending=True).values, best.values)
    assert set(table.where[0, :, 0].tolist()) == set(best.indices[0].tolist())


@pytest.fixture(scope="module")
def tiny(python_run):
    adapter = load_model(python_run)
    docs = [np.asarray(adapter.tokenizer.encode(f"def f{i}(x):\n    return x * {i}\n" * 3))
            for i in range(40)]  # fmt: skip
    return adapter, make_windows(docs, 32)


def test_dashboards_match_a_full_pass(tiny):
    adapter, windows = tiny
    site = "blocks.0.mlp_hidden"
    source = neuron_source(adapter, site)
    settings = DashboardSettings(top_k=3, sample_size=8, n_ablate=2, n_boot=50)
    body = feature_dashboards(adapter, source, windows, settings, ablate_windows=windows)
    acts = torch.cat([b.acts[b.valid] for b in site_batches(adapter, windows, site)])
    assert body["n_tokens"] == len(acts)
    density = (acts > 0).float().mean(0).numpy()
    got = np.array([f["density"] for f in body["features"]])
    np.testing.assert_allclose(got, density, atol=1e-9)
    for f in body["features"][:8]:
        top = sorted(acts[:, f["index"]].tolist(), reverse=True)[:3]
        np.testing.assert_allclose([e["act"] for e in f["top"]], top, atol=1e-4)
        for e in f["top"]:
            assert e["acts"][e["at"]] == pytest.approx(e["act"], abs=1e-3)
    ablated = [f for f in body["features"] if f["ablation"]]
    assert len(ablated) == 2 and all(f["ablation"]["n_documents"] == 40 for f in ablated)
    assert all(f["logits"] and len(f["logits"]["promoted"]) == 8 for f in body["features"][:3])


def test_direct_logits_fold_the_final_norm(tiny):
    adapter, _ = tiny
    model = adapter.model
    v = torch.randn(1, model.config.d_model)
    source = DirectionSource("blocks.1.resid_post", v.numpy(), ["v"])
    assert isinstance(model.final_norm, torch.nn.LayerNorm)  # centring and gain to fold
    unit = v / v.norm()
    unit = unit - unit.mean()
    by_hand = (unit * model.final_norm.weight.detach()) @ model.unembed.weight.detach().T
    torch.testing.assert_close(direct_logits(adapter, source), by_hand)


def test_features_command_writes_a_valid_result_and_page(python_run, tmp_path, capfd):
    from nnobs.cli import main

    out = tmp_path / "f"
    argv = ["features", "--model", python_run, "--site", "blocks.1.resid_post", "--train-sae",
            "--sae-tokens", "6000", "--expansion", "2", "--k", "4", "--tokens", "2000",
            "--n-ablate", "2", "--ablate-tokens", "512", "--n-boot", "50",
            "--out", out]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    doc = load_result(out / "features.json", "nnobs.features")
    assert doc["source"]["kind"] == "sae" and len(doc["features"]) == 64
    assert 0 < doc["sae_metrics"]["variance_explained"] <= 1
    assert load_sae(out / "sae").site == "blocks.1.resid_post"
    again = tmp_path / "again"  # the saved SAE loaded back and measured on the same tokens
    argv = ["features", "--model", python_run, "--site", "blocks.1.resid_post", "--sae",
            out / "sae", "--tokens", "500", "--n-ablate", "0", "--ablate-tokens", "512",
            "--n-boot", "50", "--out", again]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    reloaded = load_result(again / "features.json", "nnobs.features")["sae_metrics"]
    assert reloaded["variance_explained"] == pytest.approx(
        doc["sae_metrics"]["variance_explained"], abs=1e-6
    )
    page = (out / "index.html").read_text()
    assert 'id="feature-search"' in page and 'class="tok at"' in page
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    shown = next(f["index"] for f in doc["features"] if f["density"] > 0)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    dom = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", (out / "index.html").as_uri() + f"#feature-{shown}"],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    assert "1 shown" in dom  # the search script ran and kept one card
    assert f'id="feature-{shown}" data-index="{shown}">' in dom


def test_refusals(python_run, tmp_path, expect_refusal):
    other = _random_sae(site="blocks.0.resid_post", d_in=32)
    other.save(tmp_path / "other_site")
    narrow = _random_sae(site="blocks.1.resid_post", d_in=8)
    narrow.save(tmp_path / "narrow")
    out = tmp_path / "out"
    base = ["features", "--model", python_run, "--out", out]
    rows = [
        (["--site", "blocks.9.resid_post"], "out of range"),
        (["--site", "blocks.1.bogus"], "unknown hook site"),
        (["--site", "blocks.1.resid_post", "--sae", tmp_path / "other_site"], "trained on"),
        (["--site", "blocks.1.resid_post", "--sae", tmp_path / "narrow"], "8-wide"),
        (["--site", "blocks.1.resid_post", "--sae", tmp_path], "not an SAE directory"),
        (["--site", "blocks.1.resid_post"], "neurons are read at"),
        (["--site", "blocks.1.resid_post", "--pca", "0"], "n_components"),
    ]
    for extra, message in rows:
        expect_refusal([*base, *extra], message, watch=[out])


def test_probe_decomposition_finds_the_planted_feature(tiny):
    from nnobs.features.decision import probe_contributors

    adapter, _ = tiny
    rng = np.random.default_rng(0)
    probe = rng.normal(size=32)
    rows = rng.normal(size=(6, 32))
    rows[4] = 3 * probe  # feature 4 points along the probe; the others are random
    source = DirectionSource("blocks.0.resid_post", rows, [f"d{i}" for i in range(6)])
    means = np.array([0.5, 0.5, 0.5, 0.5, 2.0, 0.5])
    found = probe_contributors(adapter, source, means, "blocks.1.resid_post", probe, n=3)
    assert found["by_cosine"][0]["index"] == 4
    assert found["by_cosine"][0]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert found["by_attribution"][0]["attribution"] == pytest.approx(2.0, abs=1e-5)
    with pytest.raises(NnobsError, match="come after the probe"):
        probe_contributors(adapter, source, means, "blocks.0.resid_pre", probe)


@pytest.fixture(scope="module")
def observed(python_run, python_corpus, tmp_path_factory):
    """An observe result of ``python_run`` (small settings), written as observe.json."""
    from nnobs.core.results import write_result
    from nnobs.data.corpus import load_corpus
    from nnobs.observe.protocol import observe
    from nnobs.observe.settings import ObserveSettings

    settings = ObserveSettings(
        ex_per_dim=10, seeds=[43, 44], n_boot=50, random_heads=10, null_models=1
    )
    doc = observe(load_model(python_run), load_corpus(str(python_corpus)), settings=settings,
                  progress=False)  # fmt: skip
    return write_result(tmp_path_factory.mktemp("observe") / "observe.json", doc)


@pytest.mark.slow
def test_decompose_names_the_features_of_the_probe(python_run, observed, tmp_path):
    from nnobs.cli import main

    probe = load_result(observed, "nnobs.observe")["probe"]
    out = tmp_path / "f"
    site = f"blocks.{probe['layer']}.mlp_hidden"
    argv = ["features", "--model", python_run, "--site", site, "--decompose", observed,
            "--tokens", "1000", "--n-ablate", "0", "--out", out]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    decision = load_result(out / "features.json", "nnobs.features")["decision"]
    assert len(decision["by_cosine"]) == 10 and decision["probe_site"] == probe["site"]
    cosines = [abs(c["cosine"]) for c in decision["by_cosine"]]
    assert cosines == sorted(cosines, reverse=True) and cosines[0] > 0
    assert 'href="#feature-' in (out / "index.html").read_text()


@pytest.mark.slow  # the observe result takes most of a minute
def test_probe_refusals(python_run, observed, tmp_path, expect_refusal):
    probe = load_result(observed, "nnobs.observe")["probe"]
    later = "final"  # after every block
    out = tmp_path / "out"
    base = ["features", "--model", python_run, "--out", out]
    other_site = "blocks.0.resid_pre"
    rows = [
        (["--site", later, "--decompose", observed], "come after the probe's site"),
        (["--site", other_site, "--probe", observed], f"the probe reads {probe['site']}"),
        (["--site", other_site, "--decompose", tmp_path / "none.json"], "none.json"),
    ]
    for extra, message in rows:
        expect_refusal([*base, *extra], message, watch=[out])
