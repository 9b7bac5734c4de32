"""The benchmark's reference-protocol implementation: it must read the same tokens and the same
numbers as nnobs's capture, and run end to end (so the benchmark cannot rot)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nnobs.data.corpus import Corpus, Document
from nnobs.data.tokenizer import byte_tokenizer
from nnobs.models.adapter import nnobs_adapter
from nnobs.models.config import ModelConfig
from nnobs.models.transformer import Transformer
from nnobs.observe.capture import capture
from nnobs.observe.settings import ObserveSettings
from nnobs.observe.signal import residual_labels
from nnobs.observe.splits import token_windows

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference_protocol import collect, reference_observe, train_probe  # noqa: E402


def documents(prefix: str, n: int, seed: int) -> list[Document]:
    rng = np.random.default_rng(seed)
    words = ["def", "return", "self", "import", "for", "in", "if", "else", "(", ")", ":", "x"]
    return [
        Document(f"{prefix}{i}", " ".join(rng.choice(words, size=int(rng.integers(30, 120)))))
        for i in range(n)
    ]


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("NNOBS_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=257, d_model=16, n_layers=2, n_heads=2, max_seq_len=32)
    adapter = nnobs_adapter(Transformer(config).eval(), byte_tokenizer())
    corpus = Corpus("synthetic", {}, *(documents(s, 12, i) for i, s in enumerate("abc")))
    settings = ObserveSettings(ex_per_dim=40, seeds=[43, 44, 45], batch_size=8)
    docs = {"train": corpus.train, "validation": corpus.validation, "test": corpus.test}
    return adapter, settings, token_windows(adapter, docs, settings)


def test_collect_reads_the_same_tokens_and_values_as_capture(setup):
    adapter, settings, windows = setup
    sites = ["blocks.0.resid_post", "blocks.1.resid_post"]
    ours = capture(adapter, windows["train"], sites, dtype=np.float32, progress=False)
    ref = collect(adapter, windows["train"], sites, batch_size=5, name="train").cap
    assert len(ref.loss) == len(ours.loss) == settings.ex_per_dim * adapter.d_model
    np.testing.assert_array_equal(ref.doc_ids, ours.doc_ids)
    for name in ("loss", "max_softmax", "entropy"):
        np.testing.assert_allclose(getattr(ref, name), getattr(ours, name), rtol=1e-4, atol=1e-5)
    for site in sites:
        np.testing.assert_allclose(ref.acts[site], ours.acts[site], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ref.norms[site], ours.norms[site], rtol=1e-5)


def test_reference_protocol_runs_end_to_end(setup):
    adapter, settings, windows = setup
    result = reference_observe(adapter, windows, settings, domain2_windows=windows)
    # 2 sweep passes per layer; candidates, validation, output layer; test at two sites; domain 2
    assert result["forward_passes"] == 2 * 2 + 3 + 2 + 2
    assert sorted(result["candidates"]) == [0, 1]  # l <= int(0.8 * 2)
    assert result["layer"] == 0
    assert len(result["headline"]["per_seed"]) == 3
    assert result["tokens"] == {s: w.n_tokens for s, w in windows.items()}
    assert all(-1 < v < 1 for v in result["headline"]["per_seed"])
    assert set(result["controls"]) == {
        "none",
        "softmax_only",
        "norm_only",
        "standard",
        "plus_entropy",
        "nonlinear",
    }
    assert result["baselines"]["norm"] is None  # a covariate itself
    # Seeds are initialisation + batch order, on the same data: they differ, but not by much.
    per_seed = result["multiseed"][0]["pcorr"]
    assert len(set(per_seed)) == 3
    assert set(result["timings_s"]) >= {"capture", "sweep", "multiseed", "test", "cross_domain"}


def test_the_reference_dataloader_loop_is_reference_adam(setup):
    adapter, settings, windows = setup
    site = "blocks.0.resid_post"
    train = collect(adapter, windows["train"], [site], batch_size=8, name="train")
    X, y = train.acts(site), residual_labels(train, site, "reference")
    fast = train_probe(train, site, seed=43, device="cpu")
    literal = train_probe(train, site, seed=43, device="cpu", loader="dataloader")
    # Fewer rows than one batch: every step is full-batch, so batch order is irrelevant, and
    # nn.Linear's initialisation under the seed draws what ReferenceAdamProbe draws: the two
    # loops are the same algorithm and must agree to float rounding.
    assert len(X) < fast.batch_size
    np.testing.assert_allclose(literal.coef_, fast.coef_, rtol=1e-5, atol=1e-6)
    assert literal.intercept_ == pytest.approx(fast.intercept_, abs=1e-6)
    assert literal.objective(X, y) == pytest.approx(fast.objective(X, y), abs=1e-7)
