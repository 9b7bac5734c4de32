"""The auxiliary attribute head: labels aligned with the training stream, trained through
the trainer's extra objective, checkpointed and resumed bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
from conftest import TINY_MODEL, tiny_train_config

from nnobs.core.errors import NnobsError
from nnobs.core.rundir import read_metrics
from nnobs.data.corpus import Document, load_corpus
from nnobs.data.encoding import token_stream
from nnobs.data.tokenizer import byte_tokenizer
from nnobs.seeding.aux import IGNORED, AttributeHead, attribute_stream, aux_objective
from nnobs.training.trainer import train


def _doc(text: str, i: int = 0) -> Document:
    return Document(id=f"d{i}", text=text)


def test_labels_follow_the_training_stream_token_for_token(nnobs_cache):
    tok = byte_tokenizer()
    docs = [_doc("f(a[1])\n", 0), _doc("x = 'no(t'\n", 1), _doc("def f(:\n", 2)]
    labels = attribute_stream(docs, tok, "bracket_depth")
    stream = token_stream(docs, tok)
    assert len(labels) == len(stream)
    assert labels[:8].tolist() == [0, 0, 1, 1, 2, 1, 0, 0]  # f ( a [ 1 ] ) newline
    assert labels[8] == IGNORED and stream[8] == tok.eos_id
    strings = attribute_stream(docs, tok, "in_string")
    assert strings[9:20].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0]
    assert (labels[20:] == IGNORED).all()  # the last file is not Python: no labels
    with pytest.raises(NnobsError, match="unknown attribute"):
        attribute_stream(docs, tok, "colour")


def _head(corpus, weight=1.0, layer=1, attribute="bracket_depth") -> AttributeHead:
    docs = load_corpus(str(corpus)).train
    return aux_objective(docs, byte_tokenizer(), attribute, layer, weight, 32, 2)


def _state(run):
    last = sorted((run / "checkpoints").iterdir())[-1]
    meta = json.loads((last / "meta.json").read_text())
    return safetensors.torch.load_file(str(last / "model.safetensors")), meta


def test_aux_head_trains_and_resumes_bit_identically(
    python_corpus, nnobs_cache, tmp_path, one_thread
):
    tc = tiny_train_config(python_corpus)
    train(TINY_MODEL, tc, tmp_path / "full", progress=False, extra=_head(python_corpus))
    out = tmp_path / "cut"
    train(TINY_MODEL, tc, out, progress=False, extra=_head(python_corpus))
    # As if killed after step 8 was saved: steps 16 and 24 are gone.
    for step in (16, 24):
        (out / "checkpoints" / f"step_{step:06d}").rename(out / "checkpoints" / f".tmp-{step}")
    result = train(TINY_MODEL, tc, out, progress=False, extra=_head(python_corpus))
    assert result.resumed_from == 8
    full_weights, full_meta = _state(tmp_path / "full")
    cut_weights, cut_meta = _state(out)
    assert full_weights.keys() == cut_weights.keys()
    assert all(np.array_equal(full_weights[k], cut_weights[k]) for k in full_weights)
    head = full_meta["extra_objective"]
    assert head == cut_meta["extra_objective"]
    assert head["settings"]["site"] == "blocks.1.resid_post"
    assert np.abs(np.array(head["weights"]["head.weight"])).sum() > 0  # it learnt
    losses = [r["attr_loss"] for r in read_metrics(out) if "attr_loss" in r]
    assert losses[-1] < losses[0] - 0.1  # 1.386 = log 4 at the start (uniform over 4 classes)
    # Without the auxiliary head the same seed trains other weights.
    train(TINY_MODEL, tc, tmp_path / "plain", progress=False)
    plain_weights, plain_meta = _state(tmp_path / "plain")
    assert "extra_objective" not in plain_meta
    assert not np.array_equal(plain_weights["tok_emb.weight"], full_weights["tok_emb.weight"])


def test_resuming_with_another_objective_is_refused(python_corpus, nnobs_cache, tmp_path):
    tc = tiny_train_config(python_corpus, steps=16)
    out = tmp_path / "run"
    train(TINY_MODEL, tc.replace(steps=8), out, progress=False, extra=_head(python_corpus))
    longer = tc.replace(steps=8)
    with pytest.raises(NnobsError, match="trained with extra objective"):
        # The config must match to resume; only the objective differs.
        (out / "checkpoints" / "step_000008").rename(out / "checkpoints" / ".tmp-8")
        train(TINY_MODEL, longer, out, progress=False)
    with pytest.raises(NnobsError, match="resume with the same settings"):
        train(TINY_MODEL, longer, out, progress=False, extra=_head(python_corpus, weight=0.5))
    with pytest.raises(NnobsError, match="out of range"):
        _head(python_corpus, layer=2)
    with pytest.raises(NnobsError, match="must be positive"):
        _head(python_corpus, weight=0.0)
