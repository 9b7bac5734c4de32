"""Token windows and single-pass capture: values, padding, disk backing, failures."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from subprocess import PIPE

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnobs.core.errors import NnobsError
from nnobs.data.windows import Windows, make_windows
from nnobs.models.adapter import nnobs_adapter
from nnobs.models.config import ModelConfig
from nnobs.models.transformer import Transformer
from nnobs.observe.capture import Capture, capture, capture_scratch

VOCAB = 64


def build(**knobs) -> Transformer:
    torch.manual_seed(0)
    config = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)
    return Transformer(ModelConfig(**{**config, **knobs})).eval()


def documents(lengths=(1, 40, 7, 23, 0, 16, 2, 31)) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, VOCAB, size=n).astype(np.int32) for n in lengths]


SITES = ["embed", "blocks.0.resid_post", "blocks.1.head_out", "blocks.1.mlp_hidden", "final"]


# ------------------------------------------------------------------------------ windows


def test_windows_cover_every_next_token_pair_of_each_document_once():
    docs = documents()
    w = make_windows(docs, seq_len=8)
    assert w.n_tokens == sum(max(len(d) - 1, 0) for d in docs)
    pairs: dict[int, list] = {}
    for row in range(len(w.input_ids)):
        valid = w.valid[row]
        assert np.array_equal(valid, np.arange(8) < valid.sum())  # valid is a prefix
        pairs.setdefault(int(w.doc_ids[row]), []).extend(
            zip(w.input_ids[row][valid], w.targets[row][valid], strict=True)
        )
    for doc, got in pairs.items():
        d = docs[doc]
        assert got == list(zip(d[:-1], d[1:], strict=True))  # in order, within one document
    assert set(pairs) == {i for i, d in enumerate(docs) if len(d) > 1}
    assert (w.targets[~w.valid] == 0).all()  # right padding with id 0
    assert w.input_ids.dtype == np.int64 and w.input_ids.shape[1] == 8


def test_the_budget_is_met_exactly_in_a_seeded_document_order():
    docs = documents()
    a = make_windows(docs, seq_len=8, max_tokens=50, seed=3, split="train")
    b = make_windows(docs, seq_len=8, max_tokens=50, seed=3, split="train")
    c = make_windows(docs, seq_len=8, max_tokens=50, seed=4, split="train")
    assert a.n_tokens == 50
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.valid, b.valid)
    assert not np.array_equal(a.doc_ids, c.doc_ids)
    # Windows of one document are consecutive: it is taken whole before the next one.
    changes = np.flatnonzero(np.diff(a.doc_ids)) + 1
    assert len(set(a.doc_ids)) == len(changes) + 1


def test_a_corpus_too_small_for_the_budget_is_refused():
    with pytest.raises(NnobsError, match="corpus too small: it has 113 tokens in split valid"):
        make_windows(documents(), seq_len=8, max_tokens=114, split="validation")
    with pytest.raises(NnobsError, match="no document of two or more tokens"):
        make_windows([np.array([3]), np.array([], dtype=np.int32)], seq_len=8)
    with pytest.raises(NnobsError, match="seq_len"):
        make_windows(documents(), seq_len=0)


# ------------------------------------------------------------------------------ capture


def manual(adapter, windows: Windows, site: str):
    """Loss, max softmax, entropy and the site's rows at valid positions, one window at a time."""
    losses, softmaxes, entropies, rows = [], [], [], []
    for row in range(len(windows.input_ids)):
        n = int(windows.valid[row].sum())
        ids = torch.from_numpy(windows.input_ids[row, :n])[None]  # no padding at all
        logits, cache = adapter.run_with_cache(ids, [site])
        logp = logits[0].float().log_softmax(-1)
        target = torch.from_numpy(windows.targets[row, :n])
        losses.append(F.nll_loss(logp, target, reduction="none"))
        softmaxes.append(logp.exp().max(-1).values)
        entropies.append(-(logp.exp() * logp).sum(-1))
        rows.append(cache[site][0].flatten(1))
    return [torch.cat(x).numpy() for x in (losses, softmaxes, entropies, rows)]


# Without the `final` site capture forms logits from the last block's stream a few rows at a
# time; with it, from the model's whole logits tensor.
@pytest.mark.parametrize("sites", [SITES, SITES[:-1]], ids=["whole-logits", "row-chunk-readout"])
def test_capture_matches_a_manual_computation_without_padding(sites):
    adapter = nnobs_adapter(build())
    windows = make_windows(documents(), seq_len=8, max_tokens=90, seed=1)
    assert not windows.valid.all()  # some windows are padded
    cap = capture(adapter, windows, sites, batch_size=4, dtype=np.float32, progress=False)
    loss, max_softmax, entropy, rows = manual(adapter, windows, "blocks.1.head_out")
    np.testing.assert_allclose(cap.loss, loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cap.max_softmax, max_softmax, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cap.entropy, entropy, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cap.acts["blocks.1.head_out"], rows, rtol=1e-5, atol=1e-5)
    assert cap.acts["blocks.1.mlp_hidden"].shape == (90, 128)
    assert cap.acts["blocks.1.head_out"].shape == (90, 32)
    assert np.array_equal(cap.doc_ids, np.repeat(windows.doc_ids, windows.valid.sum(1)))
    np.testing.assert_allclose(
        cap.norms[sites[-1]], np.linalg.norm(cap.acts[sites[-1]], axis=1), rtol=1e-5
    )
    assert cap.loss.dtype == np.float32 and cap.stats["tokens"] == 90
    assert cap.stats["windows"] == len(windows.input_ids) and cap.stats["peak_rss_mb"] > 0


def test_batch_size_does_not_change_any_value():
    adapter = nnobs_adapter(build())
    windows = make_windows(documents(), seq_len=8, max_tokens=100, seed=2)
    a = capture(adapter, windows, SITES, batch_size=3, progress=False)
    b = capture(adapter, windows, SITES, batch_size=64, progress=False)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-5)
    for site in SITES:
        np.testing.assert_allclose(a.acts[site], b.acts[site], rtol=2e-3, atol=2e-3)


def test_norms_are_taken_in_float32_before_the_down_cast():
    adapter = nnobs_adapter(build())
    windows = make_windows(documents(), seq_len=8, max_tokens=40)
    half = capture(adapter, windows, ["final"], progress=False)
    full = capture(adapter, windows, ["final"], dtype=np.float32, progress=False)
    assert half.acts["final"].dtype == np.float16
    np.testing.assert_array_equal(half.norms["final"], full.norms["final"])
    np.testing.assert_allclose(half.acts["final"], full.acts["final"], rtol=1e-3, atol=1e-3)


def test_disk_backed_capture_round_trips(tmp_path):
    adapter = nnobs_adapter(build())
    windows = make_windows(documents(), seq_len=8, max_tokens=60)
    ram = capture(adapter, windows, SITES, progress=False)
    disk = capture(adapter, windows, SITES, directory=tmp_path / "cap", progress=False)
    assert isinstance(disk.acts["final"], np.memmap)
    assert not disk.acts["final"].flags.writeable
    for site in SITES:
        np.testing.assert_array_equal(disk.acts[site], ram.acts[site])
        np.testing.assert_array_equal(disk.norms[site], ram.norms[site])
    np.testing.assert_array_equal(disk.loss, ram.loss)
    files = [p for p in (tmp_path / "cap").rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(".tmp")]
    npy = sum(p.stat().st_size for p in files if p.suffix == ".npy")
    assert disk.stats["bytes_on_disk"] == npy
    meta = json.loads((tmp_path / "cap" / "capture.json").read_text())
    assert meta["sites"] == SITES and meta["tokens"] == 60

    ram.save(tmp_path / "saved")
    again = Capture.load(tmp_path / "saved")
    np.testing.assert_array_equal(
        again.acts["blocks.1.mlp_hidden"], ram.acts["blocks.1.mlp_hidden"]
    )
    np.testing.assert_array_equal(again.entropy, ram.entropy)
    assert again.stats == ram.stats


def test_a_failed_capture_leaves_no_capture_behind(tmp_path):
    model = build()
    adapter = nnobs_adapter(model)
    windows = make_windows(documents(), seq_len=8, max_tokens=60)
    capture(adapter, windows, ["final"], directory=tmp_path, progress=False)
    with torch.no_grad():
        model.blocks[1].mlp.down.weight[0, 0] = float("nan")
    with pytest.raises(NnobsError, match=r"blocks.1.resid_post has \d+ non-finite values"):
        capture(
            adapter,
            windows,
            ["blocks.0.resid_post", "blocks.1.resid_post"],
            directory=tmp_path,
            progress=False,
        )
    assert not (tmp_path / "capture.json").exists()
    assert not [p for p in tmp_path.rglob("*.tmp")]
    with pytest.raises(NnobsError, match="missing"):
        Capture.load(tmp_path)


def test_scratch_of_a_killed_process_is_swept_and_a_live_ones_kept(tmp_path, monkeypatch):
    # observe and trajectories capture into capture_scratch(); a SIGKILLed one cannot delete
    # its folder, so the next one created removes the folders whose process is gone.
    monkeypatch.setenv("NNOBS_CACHE", str(tmp_path))
    root = tmp_path / "scratch"
    hold = (
        "import sys; from nnobs.core.lock import ScratchDir; "
        f"s = ScratchDir({str(root)!r}, 'nnobs-capture-'); print(s.path, flush=True); "
        "sys.stdin.read(); s.close()"
    )
    killed, live = (
        subprocess.Popen([sys.executable, "-c", hold], stdin=PIPE, stdout=PIPE, text=True)
        for _ in range(2)
    )
    killed_dir, live_dir = (Path(p.stdout.readline().strip()) for p in (killed, live))
    (killed_dir / "acts").mkdir()
    (killed_dir / "acts" / "final.npy").write_bytes(bytes(4096))
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], stdout=PIPE)
    unlocked = root / f"nnobs-capture-{int(gone.stdout)}-abc"  # a dead PID, no lock file
    unlocked.mkdir()
    try:
        with capture_scratch("nnobs-capture-") as mine:
            assert mine.is_dir() and mine.parent == root
            assert not killed_dir.exists() and not unlocked.exists()
            assert live_dir.is_dir()
        assert not mine.exists()
    finally:
        live.communicate("")
    assert not live_dir.exists() and not any(root.iterdir())


def test_non_finite_loss_and_float16_overflow_are_named():
    model = build()
    adapter = nnobs_adapter(model)
    windows = make_windows(documents(), seq_len=8, max_tokens=30)
    with torch.no_grad():
        model.tok_emb.weight.mul_(1e7)  # embeddings beyond float16's range
    with pytest.raises(NnobsError, match="embed has values up to .* float16.*float32"):
        capture(adapter, windows, ["embed"], progress=False)
    assert (
        capture(adapter, windows, ["embed"], dtype=np.float32, progress=False).norms["embed"][0]
        > 1e5
    )
    with torch.no_grad():
        model.unembed.weight[0, 0] = float("inf")
    with pytest.raises(NnobsError, match=r"the loss has \d+ non-finite values"):
        capture(adapter, windows, [], progress=False)


def test_bad_requests_get_one_clear_error():
    adapter = nnobs_adapter(build())
    windows = make_windows(documents(), seq_len=8, max_tokens=30)
    with pytest.raises(NnobsError, match="not a per-token activation"):
        capture(adapter, windows, ["blocks.0.attn_pattern"], progress=False)
    with pytest.raises(NnobsError, match="unknown hook site"):
        capture(adapter, windows, ["blocks.0.residual_stream"], progress=False)
    with pytest.raises(NnobsError, match="float16 or float32"):
        capture(adapter, windows, ["final"], dtype=np.int8, progress=False)
    big = make_windows([np.array([1, 2, VOCAB + 5, 3])], seq_len=8)
    with pytest.raises(NnobsError, match=f"token id {VOCAB + 5} is outside the model's vocab"):
        capture(adapter, big, ["final"], progress=False)


def test_capture_on_a_hugging_face_model_masks_the_padding():
    transformers = pytest.importorskip("transformers")
    from nnobs.models.hf import hf_adapter

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
    )
    adapter = hf_adapter(transformers.AutoModelForCausalLM.from_config(config))
    windows = make_windows(documents(), seq_len=8, max_tokens=80, seed=5)
    sites = ["blocks.0.resid_mid", "blocks.1.mlp_hidden", "final"]
    cap = capture(adapter, windows, sites, batch_size=5, dtype=np.float32, progress=False)
    loss, _, entropy, rows = manual(adapter, windows, "blocks.1.mlp_hidden")
    np.testing.assert_allclose(cap.loss, loss, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cap.entropy, entropy, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cap.acts["blocks.1.mlp_hidden"], rows, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_capture_on_gpu_matches_cpu():
    model = build()
    windows = make_windows(documents(), seq_len=8, max_tokens=60)
    cpu = capture(nnobs_adapter(model), windows, SITES, dtype=np.float32, progress=False)
    gpu = capture(nnobs_adapter(model.cuda()), windows, SITES, dtype=np.float32, progress=False)
    np.testing.assert_allclose(gpu.loss, cpu.loss, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(gpu.acts["final"], cpu.acts["final"], rtol=1e-3, atol=1e-4)
    assert gpu.stats["device"].startswith("cuda")


def test_masked_vocabulary_entries_do_not_poison_the_entropy():
    from nnobs.observe.capture import _output_stats

    logits = torch.tensor([[2.0, float("-inf"), 0.5, -1.0], [0.0, 0.0, float("-inf"), 3.0]])
    targets = torch.tensor([2, 3])
    loss, top, entropy = _output_stats(logits, targets, None)
    logp = logits.log_softmax(-1)
    p = logp.exp()
    torch.testing.assert_close(loss, -logp[[0, 1], targets])
    torch.testing.assert_close(top, p.max(-1).values)
    torch.testing.assert_close(entropy, -torch.where(p > 0, p * logp, 0).sum(-1))
    # Only the kept rows come back, in order, whichever path computes them.
    kept = _output_stats(logits, targets, torch.tensor([1]))
    torch.testing.assert_close(kept[:, 0], torch.stack([loss[1], top[1], entropy[1]]))
