import json

import pytest

from nnobs.core.errors import NnobsError
from nnobs.data.corpus import Document
from nnobs.data.tasks import (
    BUILTIN,
    PromptPair,
    Task,
    builtin_task,
    encode_task,
    load_task,
    read_task_file,
    write_task_file,
)
from nnobs.data.tokenizer import byte_tokenizer, train_bpe


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A BPE whose only merges make ']]' (and a few others) single tokens."""
    docs = [Document(f"d{i}", "]]\n" * 500 + " in" * 100) for i in range(3)]
    return train_bpe(docs, vocab_size=260, cache_dir=tmp_path_factory.mktemp("bpe"))


def write_lines(path, items):
    path.write_text("\n".join(json.dumps(i) for i in items) + "\n")
    return path


ITEM = {"clean": "x = 'ab", "corrupted": 'x = "ab', "correct": "'", "incorrect": '"'}


def test_file_round_trip_and_encoding(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [ITEM, {**ITEM, "clean": "y = 'cd"}])
    task = read_task_file(path)
    assert task.name == "t" and len(task.pairs) == 2
    assert task.pairs[0] == PromptPair("x = 'ab", 'x = "ab', "'", '"')
    enc = encode_task(task, byte_tokenizer())
    assert enc.clean[0] == list(b"x = 'ab") and enc.corrupted[0] == list(b'x = "ab')
    assert enc.correct == [ord("'")] * 2 and enc.incorrect == [ord('"')] * 2
    assert enc.token_strs[0][-1] == "b" and enc.source["kind"] == "file"
    write_task_file(task, tmp_path / "copy.jsonl")
    assert read_task_file(tmp_path / "copy.jsonl").pairs == task.pairs


def test_empty_file_is_one_clear_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(NnobsError, match="has no items"):
        read_task_file(tmp_path / "empty.jsonl")


def test_bad_lines_name_the_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps(ITEM) + "\n{oops\n")
    with pytest.raises(NnobsError, match="line 2 is not valid JSON"):
        read_task_file(tmp_path / "bad.jsonl")
    write_lines(tmp_path / "missing.jsonl", [{"clean": "a", "corrupted": "b", "correct": "c"}])
    with pytest.raises(NnobsError, match="line 1: 'incorrect' must be a non-empty string"):
        read_task_file(tmp_path / "missing.jsonl")
    with pytest.raises(NnobsError, match="not found"):
        load_task(tmp_path / "nope.jsonl", byte_tokenizer())


def test_answers_must_be_single_tokens(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [ITEM, {**ITEM, "correct": "''"}])
    with pytest.raises(NnobsError, match=r"item 1: correct answer \"''\" tokenises to 2 tokens"):
        load_task(path, byte_tokenizer())
    same = write_lines(tmp_path / "same.jsonl", [{**ITEM, "incorrect": "'"}])
    with pytest.raises(NnobsError, match="same token"):
        load_task(same, byte_tokenizer())


def test_unequal_lengths_error_or_explicit_alignment(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [ITEM, {**ITEM, "corrupted": 'x = "abc'}])
    with pytest.raises(NnobsError, match="item 1: the clean prompt has 7 tokens but the corrupted"):
        load_task(path, byte_tokenizer())
    enc = load_task(path, byte_tokenizer(), align="right")
    assert enc.align == "right" and [len(c) for c in enc.corrupted] == [7, 8]
    assert sorted(map(len, enc.groups())) == [1, 1]
    assert len(load_task(path, byte_tokenizer(), equal_length=False)) == 2
    with pytest.raises(NnobsError, match="unknown alignment"):
        load_task(path, byte_tokenizer(), align="middle")


def test_builtin_tasks_are_deterministic_and_balanced():
    tok = byte_tokenizer()
    a, b = builtin_task("quote", tok, n=20), builtin_task("quote", tok, n=20)
    assert a.pairs == b.pairs and len(set(a.pairs)) == 20
    assert builtin_task("quote", tok, n=20, seed=1).pairs != a.pairs
    # Both orientations equally often, and the corrupted prompt is the clean one with the
    # other quote: same length, one character apart.
    assert sum(p.correct == "'" for p in a.pairs) == 10
    for p in a.pairs:
        assert p.clean.endswith(p.clean.lstrip()) and len(p.clean) == len(p.corrupted)
        assert sum(x != y for x, y in zip(p.clean, p.corrupted, strict=True)) == 1
        assert p.clean.count(p.correct) == 1 and p.corrupted.count(p.incorrect) == 1


def test_builtin_tasks_adapt_to_the_tokenizer(bpe):
    byte = byte_tokenizer()
    # ']]' is two bytes: the byte tokenizer gets the ']' vs newline form.
    task = load_task("bracket", byte)
    assert task.source["form"] == 1 and {task.correct[0], task.incorrect[0]} == {93, 10}
    with pytest.raises(NnobsError, match=r"' in' tokenises to \[' ', 'i', 'n'\]"):
        load_task("loop", byte)
    deep = load_task("bracket", bpe)
    assert deep.source["form"] == 0
    assert {bpe.token_str(deep.correct[0]), bpe.token_str(deep.incorrect[0])} == {"]]", "]"}
    assert len(deep) == deep.n_candidates == 64
    with pytest.raises(NnobsError, match="unknown built-in task"):
        builtin_task("nope", byte)
    assert set(BUILTIN) == {"quote", "bracket", "paren", "loop"}


def test_builtin_items_that_do_not_fit_are_dropped_and_counted():
    tok = byte_tokenizer()
    task = Task("t", [PromptPair("ab", "abc", "x", "y"), PromptPair("ab", "cd", "x", "y")], {})
    enc = encode_task(task, tok, strict=False)
    assert enc.kept == [1] and enc.n_candidates == 2 and len(enc) == 1
    with pytest.raises(NnobsError, match="no usable items"):
        encode_task(Task("t", task.pairs[:1], {}), tok, strict=False)


def test_subset_keeps_items_aligned():
    task = load_task("quote", byte_tokenizer(), n=8)
    sub = task.subset([5, 1])
    assert sub.kept == [5, 1] and sub.n_candidates == 8
    assert sub.clean == [task.clean[5], task.clean[1]]
    assert sub.correct == [task.correct[5], task.correct[1]]
    assert sub.corrupted_strs[0] == task.corrupted_strs[5]
    with pytest.raises(NnobsError, match="item 8 is out of range"):
        task.subset([8])
