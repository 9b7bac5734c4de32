import json

import pytest

import nnobs.data.tokenizer as tokenizer_module
from nnobs.core.errors import NnobsError
from nnobs.data.corpus import Corpus, Document
from nnobs.data.tokenizer import (
    EOS,
    byte_tokenizer,
    from_hf,
    get_tokenizer,
    load_tokenizer,
    train_bpe,
)

TRICKY = [
    "",
    "def f(x):\n\treturn x  # tab, two spaces\r\n",
    "naïve café — 日本語 ☃ 🐍\u200b\n",
    "   leading and trailing   \n\n\n",
    f"text that mentions {EOS} literally",
    "\x00\x7f control bytes",
]


def _docs(n: int = 60) -> list[Document]:
    return [
        Document(
            f"m{i}.py",
            f"class Thing{i}:\n    def method(self, value):\n"
            f"        return self.items[{i}] + value  # comment {i}\n",
        )
        for i in range(n)
    ]


@pytest.fixture
def bpe(tmp_path):
    return train_bpe(_docs(), 320, cache_dir=tmp_path)


def test_byte_tokenizer_round_trips_losslessly():
    tok = byte_tokenizer()
    assert (tok.vocab_size, tok.eos_id, tok.kind) == (257, 256, "byte")
    for text in TRICKY:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.decode([104, 105, 256, 33]) == f"hi{EOS}!"
    assert [tok.token_str(i) for i in (97, 0xC3, 256)] == ["a", "\\xc3", EOS]


def test_bpe_round_trips_and_respects_vocab_size(bpe):
    assert bpe.kind == "bpe" and bpe.vocab_size == 320 and bpe.eos_id == 0
    for text in TRICKY:
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text
        assert all(0 <= i < 320 for i in ids)
    assert bpe.eos_id not in bpe.encode(TRICKY[4])  # literal eos text is not a boundary
    assert bpe.encode_batch(TRICKY) == [bpe.encode(t) for t in TRICKY]
    # Merges learned from the corpus compress it well below one token per byte.
    sample = _docs()[0].text
    assert len(bpe.encode(sample)) < len(sample.encode()) / 2
    assert "".join(bpe.token_str(i) for i in bpe.encode(sample)) == sample
    assert [bpe.token_str(i) for i in bpe.encode("é")] in (["é"], ["\\xc3", "\\xa9"])
    assert bpe.token_str(bpe.eos_id) == EOS


def test_bpe_is_cached_by_content(tmp_path, monkeypatch):
    calls = []
    train = tokenizer_module._train

    def counting(texts, vocab_size):
        calls.append(vocab_size)
        return train(texts, vocab_size)

    monkeypatch.setattr(tokenizer_module, "_train", counting)
    first = train_bpe(_docs(), 300, cache_dir=tmp_path)
    files = list(tmp_path.glob("bpe-*.json"))
    assert len(files) == 1 and first.reference()["path"] == str(files[0])
    second = train_bpe(_docs(), 300, cache_dir=tmp_path)
    assert calls == [300] and second.fingerprint == first.fingerprint
    train_bpe(_docs(), 310, cache_dir=tmp_path)
    train_bpe(_docs()[:-1], 300, cache_dir=tmp_path)
    assert calls == [300, 310, 300] and len(list(tmp_path.glob("bpe-*.json"))) == 3
    files[0].write_text("not a tokenizer")  # damaged cache entry: retrained, not trusted
    assert train_bpe(_docs(), 300, cache_dir=tmp_path).fingerprint == first.fingerprint
    assert len(calls) == 4


def test_get_tokenizer_trains_on_the_training_split_only(tmp_path, monkeypatch):
    seen = []
    train = tokenizer_module._train

    def recording(texts, vocab_size):
        seen.extend(texts)
        return train(texts, vocab_size)

    monkeypatch.setattr(tokenizer_module, "_train", recording)
    docs = _docs(12)
    corpus = Corpus("toy", {}, docs[:8], docs[8:10], docs[10:])
    tok = get_tokenizer("bpe", corpus, 300, cache_dir=tmp_path)
    assert seen == [d.text for d in docs[:8]] and tok.kind == "bpe"
    assert get_tokenizer("byte", corpus, 300).kind == "byte"
    with pytest.raises(NnobsError, match="unknown tokenizer kind"):
        get_tokenizer("wordpiece", corpus, 300)
    with pytest.raises(NnobsError, match="at least 257"):
        train_bpe(docs, 100, cache_dir=tmp_path)


def test_save_and_reload(bpe, tmp_path):
    ref = bpe.save(tmp_path / "run")
    assert ref["path"] == str((tmp_path / "run" / "tokenizer.json").resolve())
    json.dumps(ref)
    for source in (ref, tmp_path / "run", tmp_path / "run" / "tokenizer.json"):
        again = load_tokenizer(source)
        assert again.fingerprint == bpe.fingerprint
        assert again.encode(TRICKY[2]) == bpe.encode(TRICKY[2])
    byte_ref = byte_tokenizer().save(tmp_path / "unused")
    assert byte_ref["path"] is None and load_tokenizer(byte_ref).kind == "byte"


def test_load_tokenizer_rejects_non_tokenizers(bpe, tmp_path):
    (tmp_path / "x.json").write_text('{"hello": 1}')
    with pytest.raises(NnobsError, match="is not a tokenizer file"):
        load_tokenizer(tmp_path / "x.json")
    with pytest.raises(NnobsError, match="does not exist"):
        load_tokenizer(tmp_path / "nothing")
    ref = bpe.save(tmp_path)
    with pytest.raises(NnobsError, match="fingerprint"):
        load_tokenizer({**ref, "fingerprint": "0" * 16})
    with pytest.raises(NnobsError, match="cannot be reloaded"):
        load_tokenizer({"kind": "bpe", "path": None})


def test_from_hf_wraps_a_transformers_tokenizer(bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    path = bpe.save(tmp_path / "bpe")["path"]
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=path, eos_token=EOS)
    tok = from_hf(hf)
    assert (tok.kind, tok.eos_id, tok.vocab_size) == ("hf", bpe.eos_id, 320)
    text = TRICKY[1] + TRICKY[2]
    assert tok.encode(text) == bpe.encode(text) and tok.decode(tok.encode(text)) == text
    assert tok.encode_batch([text, "x"]) == [tok.encode(text), tok.encode("x")]
    ref = tok.save(tmp_path / "hf")
    again = load_tokenizer(ref)
    assert again.kind == "hf" and again.fingerprint == tok.fingerprint
    no_eos = transformers.PreTrainedTokenizerFast(tokenizer_file=path)
    with pytest.raises(NnobsError, match="no eos token"):
        from_hf(no_eos)
