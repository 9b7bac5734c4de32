import numpy as np
import pytest
import torch

from nnobs.core.errors import NnobsError
from nnobs.data.corpus import Document
from nnobs.data.python_labels import (
    ATTRIBUTES,
    CLASSES,
    UnalignedTokens,
    UntokenizableSource,
    python_char_labels,
    token_char_starts,
)
from nnobs.data.tokenizer import byte_tokenizer, train_bpe
from nnobs.data.windows import make_windows
from nnobs.models.adapter import nnobs_adapter
from nnobs.models.config import ModelConfig
from nnobs.models.transformer import Transformer
from nnobs.observe.attribute_probes import (
    AttributeData,
    SoftmaxProbe,
    attribute_dataset,
    control_labels,
    probe_attributes,
)

T = {name: code for code, name in enumerate(CLASSES["token_type"])}


def digits(values: np.ndarray) -> str:
    return "".join(str(int(v)) for v in values)


def types(source: str) -> str:
    """Token types as one letter per character (w s=whitespace/string by case)."""
    letter = {"whitespace": ".", "name": "n", "keyword": "k", "op": "o", "number": "1"}
    letter |= {"string": "s", "comment": "#"}
    codes = python_char_labels(source)["token_type"]
    return "".join(letter[CLASSES["token_type"][c]] for c in codes)


# ------------------------------------------------------------------------------ labels


def test_bracket_depth_of_nested_brackets():
    src = "f(a[b{c}])\n"
    labels = python_char_labels(src)
    assert digits(labels["bracket_depth"]) == "00112232100"
    assert types(src) == "nonononooo."
    # depth 3 and deeper share the capped class
    assert digits(python_char_labels("((((x))))")["bracket_depth"]) == "012333210"
    # brackets inside strings and comments do not count
    assert digits(python_char_labels("g('(', 1)  # (\n")["bracket_depth"]) == "001111110000000"


def test_in_string_for_quotes_triple_quotes_and_fstrings():
    src = 's = \'a\' + """x\ny""" + f"{v[0]}w" + rb\'z\'\n'
    in_string = digits(python_char_labels(src)["in_string"])
    #           s = 'a' + """x⏎y""" + f"{v[0]}w" + rb'z'⏎
    expected = "0000111000111111111000111111111100011111" + "0"
    assert in_string == expected
    # the f-string's replacement field is part of the string: type string, no bracket depth
    labels = python_char_labels(src)
    fstart = src.index('f"')
    assert set(labels["token_type"][fstart : fstart + 10]) == {T["string"]}
    assert set(labels["bracket_depth"][fstart : fstart + 10]) == {0}


def test_indent_levels_of_nested_blocks():
    src = "class A:\n    def f(self):\n        if x:\n            y\n        # note\n    z = 1\nq\n"
    levels = python_char_labels(src)["indent_level"]
    by_line = [digits(levels[a : a + len(line) + 1]) for a, line in _lines(src)]
    assert by_line == [
        "000000000",  # class A:
        "1" * 17,  # def f(self):
        "2" * 14,  # if x:
        "3" * 14,  # y
        "3" * 15,  # a comment keeps the level of the block it sits in
        "1" * 10,  # z = 1: the dedent applies from the start of the line
        "00",  # q
    ]
    deep = "".join(" " * i + f"if a{i}:\n" for i in range(6)) + " " * 6 + "b\n"
    assert python_char_labels(deep)["indent_level"].max() == 4  # capped: "4+"


def _lines(src: str):
    start = 0
    for line in src.split("\n")[:-1]:
        yield start, line
        start += len(line) + 1


def test_keywords_names_and_other_types():
    src = "for match in x: pass  # hi\nn = 3.5 if True else None\n"
    assert types(src) == (
        "kkk.nnnnn.kk.no.kkkk..####."  # 'match' is a soft keyword: a name
        + "n.o.111.kk.kkkk.kkkk.kkkk."
    )


def test_source_without_final_newline_and_empty_source():
    labels = python_char_labels("x = [1,\n 2]")
    assert digits(labels["bracket_depth"]) == "00000111110"
    assert all(len(v) == 0 for v in python_char_labels("").values())


@pytest.mark.parametrize(
    "src",
    [
        "if x:\n    a\n  b\n",  # inconsistent dedent
        "x = (1,\n",  # EOF inside brackets
        "s = 'abc\nt = 1\n",  # unterminated string
        'doc = """never closed\n',
        "a = $b\n",
    ],
)
def test_untokenizable_sources_raise(src):
    with pytest.raises(UntokenizableSource):
        python_char_labels(src)


# ------------------------------------------------------------------------------ alignment


TEXT = "s = 'héllo → wörld 🐍'\nx = [1]  # é\n"


def test_byte_tokens_start_at_their_characters():
    tok = byte_tokenizer()
    ids = tok.encode(TEXT)
    starts = token_char_starts(tok, ids, TEXT)
    expected = [i for i, ch in enumerate(TEXT) for _ in ch.encode("utf-8")]
    np.testing.assert_array_equal(starts, expected)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    texts = ["def f(x):\n    return x + 1\n", "s = 'héllo → wörld'\n# ünï 🐍\n", "y = [é, 'é']\n"]
    docs = [Document(f"d{i}", t) for i, t in enumerate(texts * 4)]
    return train_bpe(docs, 300, cache_dir=tmp_path_factory.mktemp("bpe"))


def test_bpe_tokens_start_where_the_tokenizer_says(bpe):
    ids = bpe.encode(TEXT)
    starts = token_char_starts(bpe, ids, TEXT)
    # the tokenizers library's own character offsets are the reference
    offsets = bpe._tok.encode(TEXT, add_special_tokens=False).offsets
    np.testing.assert_array_equal(starts, [a for a, _ in offsets])
    assert len(ids) < len(TEXT.encode("utf-8"))  # merges happened, some across a character


def test_tokens_that_do_not_rebuild_the_text_are_rejected():
    class Lossy:  # drops spaces when decoding, as some sentencepiece decoders do per token
        def decode(self, ids):
            return "".join(chr(i) for i in ids).replace(" ", "")

    with pytest.raises(UnalignedTokens):
        token_char_starts(Lossy(), [ord(c) for c in "a b"], "a b")


# ------------------------------------------------------------------------------ dataset


DOCS = [
    Document("a.py", "def f(x):\n    if x:\n        return [x, (1, 2)]\n    return 'no'\n"),
    Document("bad.py", "def g(:\n  return (\n"),
    Document("b.py", 'class C:\n    s = """doc\nstring"""\n    def m(self):\n        pass\n'),
    Document("c.py", "for i in range(3):\n    print(f'{i}', {'k': [i]})  # done\n"),
]


def tiny_adapter(d_model: int = 16):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=257, d_model=d_model, n_layers=2, n_heads=2, max_seq_len=32)
    return nnobs_adapter(Transformer(config).eval(), byte_tokenizer())


def test_attribute_dataset_labels_every_captured_row(tmp_path):
    sites = ["embed", "blocks.1.resid_post"]
    data = attribute_dataset(
        tiny_adapter(), DOCS, sites, max_tokens=None, seq_len=24, seed=3, cache_dir=tmp_path
    )
    assert data.counts == {"documents": 4, "untokenizable": 1, "unaligned": 0, "used": 3}
    n = len(data.token_ids)
    good = [d for i, d in enumerate(DOCS) if i != 1]
    assert n == sum(len(d.text) - 1 for d in good)  # every next-token pair of the good docs
    assert data.acts["embed"].shape == (n, 16) and data.acts["blocks.1.resid_post"].shape == (n, 16)
    assert set(data.labels) == set(ATTRIBUTES) and all(len(v) == n for v in data.labels.values())
    assert 1 not in set(data.doc_ids)  # the broken document never contributes rows

    # Rebuild each row's place from the documented windowing: consecutive chunks of seq_len
    # positions per document, valid positions a prefix of each window; the skipped document
    # is empty. ASCII text with byte tokens: token index == character index.
    texts = [d.text if i != 1 else "" for i, d in enumerate(DOCS)]
    windows = make_windows([np.frombuffer(t.encode(), np.uint8) for t in texts], 24, None, 3)
    row, chunk_of = 0, {}
    for w, doc in enumerate(windows.doc_ids):
        k = chunk_of[doc] = chunk_of.get(doc, -1) + 1
        chars = python_char_labels(texts[doc])
        for t in np.flatnonzero(windows.valid[w]):
            pos = k * 24 + t
            assert data.doc_ids[row] == doc and data.token_ids[row] == ord(texts[doc][pos])
            for a in ATTRIBUTES:
                assert data.labels[a][row] == chars[a][pos]
            row += 1
    assert row == n
    assert data.labels["in_string"].any() and data.labels["bracket_depth"].max() >= 2

    budget = attribute_dataset(
        tiny_adapter(), DOCS, ["final"], max_tokens=50, seq_len=24, cache_dir=tmp_path
    )
    assert len(budget.token_ids) == 50 and budget.acts["final"].shape == (50, 16)


def test_attribute_dataset_needs_some_python(tmp_path):
    with pytest.raises(NnobsError, match="1 documents not tokenizable"):
        attribute_dataset(tiny_adapter(), [DOCS[1]], ["embed"], max_tokens=10, cache_dir=tmp_path)


# ------------------------------------------------------------------------------ probes


def synthetic(n: int, seed: int, encode_depth: bool, n_types: int = 60, d: int = 24):
    """Tokens of ``n_types`` types; depth labels independent of the type; activations that
    encode depth linearly (or nothing)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, n_types, n)
    depth = rng.choice(4, size=n, p=[0.4, 0.3, 0.2, 0.1])
    acts = rng.standard_normal((n, d))
    if encode_depth:
        directions = np.random.default_rng(99).standard_normal((4, d))
        acts += 3.0 * directions[depth]
    labels = {"bracket_depth": depth, "in_string": (ids % 2).astype(np.int8)}
    return AttributeData({"blocks.0.resid_post": acts}, labels, ids, np.zeros(n, int))


def test_planted_linear_encoding_is_accurate_and_selective():
    train, test = synthetic(3000, 0, True), synthetic(1000, 1, True)
    r = probe_attributes(train, test, attributes=["bracket_depth"], seed=0)
    site = r["attributes"]["bracket_depth"]["sites"]["blocks.0.resid_post"]
    assert site["accuracy"] > 0.9
    assert site["majority_baseline"] == pytest.approx(0.4, abs=0.05)
    assert site["control_accuracy"] < 0.5  # token identity is not in the activations
    assert site["selectivity"] > 0.45
    assert site["shuffled_accuracy"] < 0.45
    assert site["converged"]
    assert r["n_train"] == 3000 and r["n_test"] == 1000


def test_random_activations_have_no_selectivity():
    train, test = synthetic(3000, 0, False), synthetic(1000, 1, False)
    r = probe_attributes(train, test, attributes=["bracket_depth"])
    site = r["attributes"]["bracket_depth"]["sites"]["blocks.0.resid_post"]
    assert site["accuracy"] == pytest.approx(site["majority_baseline"], abs=0.05)
    assert abs(site["selectivity"]) < 0.1


def test_token_identity_encoding_is_accurate_but_not_selective():
    # activations are an embedding of the token id, and the label is a function of the id:
    # a probe reads it perfectly, and memorises the control task almost as well
    rng = np.random.default_rng(5)
    table = rng.standard_normal((60, 64))
    train, test = synthetic(3000, 0, False), synthetic(1000, 1, False)
    for data in (train, test):
        data.acts["blocks.0.resid_post"] = table[data.token_ids] + 0.05 * rng.standard_normal(
            (len(data.token_ids), 64)
        )
    r = probe_attributes(train, test, attributes=["in_string"])
    site = r["attributes"]["in_string"]["sites"]["blocks.0.resid_post"]
    assert site["accuracy"] > 0.97
    assert site["control_accuracy"] > 0.85
    assert site["selectivity"] < 0.15


def test_control_labels_follow_the_label_distribution_per_type():
    rng = np.random.default_rng(0)
    ids_train, ids_test = rng.integers(0, 500, 20000), rng.integers(0, 520, 300)
    y = rng.choice(3, size=20000, p=[0.7, 0.2, 0.1])
    ctrl_train, ctrl_test = control_labels(ids_train, ids_test, y, seed=1)
    for i in (3, 77, 499):  # one label per type, the same in both splits
        assert len(set(ctrl_train[ids_train == i]) | set(ctrl_test[ids_test == i])) == 1
    per_type = np.array([ctrl_train[ids_train == i][0] for i in np.unique(ids_train)])
    np.testing.assert_allclose(np.bincount(per_type) / len(per_type), [0.7, 0.2, 0.1], atol=0.06)
    assert len(ctrl_test) == 300  # unseen test-only types are labelled too


def test_single_class_attribute_is_skipped_and_bad_names_rejected():
    train, test = synthetic(200, 0, True), synthetic(100, 1, True)
    train.labels["in_string"] = np.zeros(200, np.int8)
    r = probe_attributes(train, test, attributes=["in_string"])
    assert "skipped" in r["attributes"]["in_string"]["sites"]["blocks.0.resid_post"]
    with pytest.raises(NnobsError, match="unknown attribute"):
        probe_attributes(train, test, attributes=["colour"])
    with pytest.raises(NnobsError, match="no 'token_type' labels"):
        probe_attributes(train, test, attributes=["token_type"])
    with pytest.raises(NnobsError, match="no activations"):
        probe_attributes(train, test, attributes=["in_string"], sites=["final"])


def test_softmax_probe_matches_scikit_learn_on_standardised_inputs():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(3)
    X = rng.standard_normal((600, 5)) * [1, 10, 0.1, 3, 1] + 4
    y = np.argmax(X @ rng.standard_normal((5, 3)) + rng.gumbel(size=(600, 3)), 1) * 2 + 1
    probe = SoftmaxProbe(C=0.5, tol=1e-6).fit(X, y)
    Z = (X - X.mean(0)) / X.std(0)
    reference = LogisticRegression(C=0.5, tol=1e-10, max_iter=1000).fit(Z, y)
    np.testing.assert_array_equal(probe.classes_, [1, 3, 5])
    np.testing.assert_allclose(probe.weight_.numpy(), reference.coef_.T, atol=2e-3)
    assert probe.converged_
    assert np.mean(probe.predict(X) == reference.predict(Z)) > 0.99
    assert probe.score(X, y) == pytest.approx(reference.score(Z, y), abs=0.01)
    one = SoftmaxProbe().fit(X, np.full(600, 7))
    assert one.score(X[:10], np.full(10, 7)) == 1.0
    with pytest.raises(NnobsError, match="not fitted"):
        SoftmaxProbe().predict(X)
