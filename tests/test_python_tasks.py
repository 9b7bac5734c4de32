"""The 20 Python tasks of the weight-sparse paper, the tokenizer that keeps their answers
single tokens, and the binary task loss."""

import math

import numpy as np
import pytest
import torch

from nnobs.circuits.task_loss import binary_task_loss, item_losses, task_loss
from nnobs.core.errors import NnobsError
from nnobs.data.corpus import load_corpus
from nnobs.data.python_tasks import (
    ANSWER_PIECES,
    PYTHON_TASKS,
    load_python_task,
    python_task,
    split_of,
)
from nnobs.data.tokenizer import byte_tokenizer, get_tokenizer
from nnobs.models.adapter import nnobs_adapter
from nnobs.models.config import ModelConfig
from nnobs.models.transformer import Transformer

PAPER_TASKS = {
    "single_double_quote", "final_kwarg", "set_or_string", "set_or_string_fixedvarname",
    "class_init", "with_as", "bracket_brace", "with_open", "bracket_counting", "for_while",
    "else_elif", "fstring_brace", "if_ternary", "var_swap", "indent_for", "lambda_func",
    "if_equals", "enumerate_range", "var_if", "while_return_true",
}  # fmt: skip
VOCAB = 512  # small enough to train fast, small enough that plain BPE splits many answers


@pytest.fixture(scope="module")
def tokenizers_(tmp_path_factory):
    """(plain BPE, BPE with the task answers reserved) on the same stdlib slice."""
    cache = tmp_path_factory.mktemp("bpe")
    corpus = load_corpus("stdlib", max_chars=300_000)
    return tuple(get_tokenizer(k, corpus, VOCAB, cache_dir=cache) for k in ("bpe", "bpe_tasks"))


def test_the_suite_is_the_papers_twenty_tasks():
    assert set(PYTHON_TASKS) == PAPER_TASKS


def test_the_task_tokenizer_makes_every_answer_one_token_at_the_same_size(tokenizers_):
    plain, tasks = tokenizers_
    assert tasks.vocab_size == plain.vocab_size == VOCAB
    assert all(len(tasks.encode(a)) == 1 for a in ANSWER_PIECES)
    split = [a for a in ANSWER_PIECES if len(plain.encode(a)) != 1]
    assert len(split) >= 5  # the reservation does real work at this size
    text = "for i, x in enumerate(data):\n    y = {x: [i]}\n"
    assert tasks.decode(tasks.encode(text)) == text


@pytest.mark.parametrize("name", sorted(PAPER_TASKS))
def test_each_task_is_well_formed(name, tokenizers_):
    _, tok = tokenizers_
    train, again = python_task(name, n=64), python_task(name, n=64)
    heldout = python_task(name, "heldout", n=32)
    assert train.pairs == again.pairs  # deterministic
    assert python_task(name, n=64, seed=1).pairs != train.pairs
    assert len(train.pairs) == 64 and len(heldout.pairs) == 32
    assert len(set(train.pairs)) == 64
    declared = set(PYTHON_TASKS[name].answers)
    for pair in train.pairs:
        assert pair.correct != pair.incorrect and {pair.correct, pair.incorrect} <= declared
        assert pair.clean != pair.corrupted
        assert split_of(pair) == "train"
    if len(declared) == 2:  # two fixed answers: each is the correct one for half the items
        assert sum(p.correct == train.pairs[0].correct for p in train.pairs) == 32
    train_prompts = {p for pair in train.pairs for p in (pair.clean, pair.corrupted)}
    held_prompts = {p for pair in heldout.pairs for p in (pair.clean, pair.corrupted)}
    assert not train_prompts & held_prompts
    encoded = load_python_task(name, tok, n=64)
    assert len(encoded) == 64
    assert all(c != i for c, i in zip(encoded.correct, encoded.incorrect, strict=True))


@pytest.mark.parametrize("name", sorted(PAPER_TASKS))
def test_every_prompt_has_one_counterpart_so_splits_never_share_a_prompt(name):
    partner = {}
    for seed in range(3):
        for split in ("train", "heldout"):
            for pair in python_task(name, split, n=100, seed=seed).pairs:
                for a, b in ((pair.clean, pair.corrupted), (pair.corrupted, pair.clean)):
                    assert partner.setdefault(a, b) == b, a


def test_a_foreign_tokenizer_is_refused_naming_the_split_answers():
    with pytest.raises(NnobsError) as caught:
        load_python_task("enumerate_range", byte_tokenizer())
    message = str(caught.value)
    assert "\n" not in message and "' enumerate'" in message and "' range'" in message
    assert "bpe_tasks" in message


def test_unknown_task_or_split_is_one_clear_error():
    with pytest.raises(NnobsError, match="unknown Python task 'nope': choose one of"):
        python_task("nope")
    with pytest.raises(NnobsError, match="unknown split 'test'"):
        python_task("var_if", "test")


def test_task_loss_is_binary_cross_entropy_of_the_last_logits(tokenizers_):
    _, tok = tokenizers_
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2)).eval()
    adapter = nnobs_adapter(model, tok)
    task = load_python_task("bracket_counting", tok, n=8)
    by_hand = []
    with torch.no_grad():
        for ids, c, i in zip(task.clean, task.correct, task.incorrect, strict=True):
            last = model(torch.tensor([ids]))[0, -1].double()
            p_correct = torch.softmax(last[[c, i]], 0)[0]
            by_hand.append(-math.log(p_correct))
    np.testing.assert_allclose(item_losses(adapter, task), by_hand, rtol=1e-5)
    assert task_loss(adapter, task) == pytest.approx(np.mean(by_hand), rel=1e-5)
    # Chance is log 2; a certain right answer costs nothing, a certain wrong one a lot.
    assert binary_task_loss(torch.zeros(4)).item() == pytest.approx(math.log(2))
    assert binary_task_loss(torch.full((4,), 50.0)).item() < 1e-12
    assert binary_task_loss(torch.full((4,), -50.0)).item() == pytest.approx(50.0)


@pytest.mark.slow
def test_a_run_trained_with_the_task_tokenizer_scores_every_task(tmp_path, monkeypatch):
    from test_train import TC

    from nnobs.models.load import load_model
    from nnobs.training.trainer import train

    monkeypatch.setenv("NNOBS_CACHE", str(tmp_path / "cache"))
    mc = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)
    train(mc, TC.replace(tokenizer="bpe_tasks", max_chars=300_000), tmp_path / "run")
    adapter = load_model(tmp_path / "run")  # the tokenizer as the run saved it
    for name in PYTHON_TASKS:
        loss = task_loss(adapter, load_python_task(name, adapter.tokenizer, "heldout", n=8))
        assert 0 < loss < 5, name
