import json
import random

import numpy as np
import pytest
import torch

from nnobs.core.errors import NnobsError
from nnobs.core.rundir import is_nnobs_path, list_checkpoints
from nnobs.data.tokenizer import byte_tokenizer
from nnobs.models.checkpoint import load_checkpoint, load_weights
from nnobs.models.config import ModelConfig
from nnobs.models.load import load_model
from nnobs.models.transformer import Transformer
from nnobs.training.checkpoint import load_training_state, remove_partial, save_checkpoint

CFG = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)


def trained_pair(steps: int = 3):
    torch.manual_seed(0)
    model = Transformer(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 257, (4, 17))
    for _ in range(steps):
        loss, _ = model.training_loss(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt, x


def save(run_dir, step, model, opt=None):
    meta = {"tokenizer": byte_tokenizer().reference(), "tokens_seen": 64 * step,
            "corpus": {"spec": "stdlib", "fingerprint": "abc"}}  # fmt: skip
    return save_checkpoint(run_dir, step, model, meta, opt)


def test_round_trip_weights_meta_and_provenance(tmp_path):
    model, opt, x = trained_pair()
    path = save(tmp_path, 7, model, opt)
    assert path == tmp_path / "checkpoints" / "step_000007"
    loaded = load_checkpoint(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.model.state_dict()[name]), name
    assert loaded.model.unembed.weight is loaded.model.tok_emb.weight  # still tied
    assert loaded.config == CFG and loaded.step == 7 and loaded.tokenizer.vocab_size == 257
    prov = loaded.provenance()
    assert prov["step"] == 7 and prov["config_hash"] == CFG.hash
    assert prov["tokens_seen"] == 448 and prov["corpus_fingerprint"] == "abc"
    with torch.no_grad():
        assert torch.equal(model(x[:, :-1]), loaded.model(x[:, :-1]))


def test_optimizer_and_rng_restore_exactly(tmp_path):
    model, opt, x = trained_pair()
    path = save(tmp_path, 3, model, opt)
    random.random(), np.random.rand(), torch.rand(1)  # move every RNG on
    fresh = Transformer(CFG)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    load_weights(fresh, path)
    load_training_state(path, fresh_opt)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    load_training_state(path, fresh_opt)
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])
    for m, o in ((model, opt), (fresh, fresh_opt)):  # one more identical step on both
        loss, _ = m.training_loss(x[:, :-1], x[:, 1:])
        loss.backward()
        o.step()
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def test_listing_skips_partial_and_foreign_entries(tmp_path):
    model, _, _ = trained_pair(0)
    save(tmp_path, 0, model)
    save(tmp_path, 16, model)
    (tmp_path / "checkpoints" / ".tmp-step_000032-x").mkdir()
    (tmp_path / "checkpoints" / "step_000032").mkdir()  # no meta.json: not complete
    (tmp_path / "checkpoints" / "notes").mkdir()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [0, 16]
    remove_partial(tmp_path)
    assert not (tmp_path / "checkpoints" / ".tmp-step_000032-x").exists()
    assert load_checkpoint(tmp_path).step == 16
    assert load_checkpoint(tmp_path, step=0).step == 0
    with pytest.raises(NnobsError, match="no checkpoint at step 5: it has 0, 16"):
        load_checkpoint(tmp_path, step=5)


def test_is_nnobs_path(tmp_path):
    model, _, _ = trained_pair(0)
    path = save(tmp_path / "run", 0, model)
    assert is_nnobs_path(path)
    (tmp_path / "run" / "run.json").write_text("{}")
    assert is_nnobs_path(tmp_path / "run")
    assert not is_nnobs_path(tmp_path)
    assert not is_nnobs_path(path / "model.safetensors")


def test_truncated_weights_are_a_clear_error(tmp_path):
    model, _, _ = trained_pair(0)
    path = save(tmp_path, 0, model)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(NnobsError, match="are corrupt"):
        load_checkpoint(path)
    with pytest.raises(NnobsError, match="are corrupt"):  # through the model loader too
        load_model(path)


def test_missing_meta_is_a_clear_error(tmp_path):
    model, _, _ = trained_pair(0)
    path = save(tmp_path, 0, model)
    (path / "meta.json").unlink()
    with pytest.raises(NnobsError, match="incomplete or damaged: meta.json is missing"):
        load_model(path)


def test_foreign_or_garbled_meta(tmp_path):
    model, _, _ = trained_pair(0)
    path = save(tmp_path, 0, model)
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(NnobsError, match="is not an nnobs checkpoint"):
        load_checkpoint(path)
    (path / "meta.json").write_text('{"format": ')
    with pytest.raises(NnobsError, match="unreadable or corrupt"):
        load_checkpoint(path)


def test_weights_of_another_architecture(tmp_path):
    model, _, _ = trained_pair(0)
    path = save(tmp_path, 0, model)
    meta = json.loads((path / "meta.json").read_text())
    meta["config"]["d_model"] = 64
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(NnobsError, match="do not match the checkpoint's config"):
        load_checkpoint(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(NnobsError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing")
    with pytest.raises(NnobsError, match="not an nnobs run or checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(NnobsError, match="no complete checkpoint yet"):
        load_checkpoint(tmp_path)
