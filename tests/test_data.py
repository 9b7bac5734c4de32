import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nnobs.core.errors import NnobsError
from nnobs.data.corpus import SPLITS, Document, docs_fingerprint, load_corpus
from nnobs.data.encoding import encode_documents, token_stream
from nnobs.data.tokenizer import ByteTokenizer


def _ids(corpus) -> dict[str, set[str]]:
    return {name: {d.id for d in corpus.split(name)} for name in SPLITS}


def _write_tree(root: Path, n: int) -> None:
    for i in range(n):
        sub = root / f"pkg{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"mod_{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n")


def test_stdlib_split_deterministic_disjoint_and_without_tests():
    a, b = load_corpus("stdlib"), load_corpus("stdlib")
    assert a.fingerprint == b.fingerprint
    assert [d.id for d in a.train] == [d.id for d in b.train]
    ids = _ids(a)
    assert all(ids.values())
    assert not (ids["train"] & ids["validation"] or ids["train"] & ids["test"])
    assert not ids["validation"] & ids["test"]
    every = set().union(*ids.values())
    assert "json/decoder.py" in every and "os.py" in every
    assert not any(i.startswith(("test/", "site-packages/")) for i in every)
    assert not any("/idle_test/" in i or "/tests/" in i for i in every)
    n = len(every)
    assert 0.7 < len(ids["train"]) / n < 0.9  # hash assignment follows the 0.8 fraction
    assert a.source["kind"] == "stdlib" and a.source["n_chars"] > 1_000_000

    tests = load_corpus("stdlib-tests")
    test_ids = set().union(*_ids(tests).values())
    assert test_ids and all(i.startswith("test/") for i in test_ids)
    assert not test_ids & every


def test_adding_a_document_moves_no_other(tmp_path):
    _write_tree(tmp_path, 40)
    before = _ids(load_corpus(str(tmp_path)))
    (tmp_path / "pkg0" / "new.py").write_text("x = 1\n")
    after = _ids(load_corpus(str(tmp_path)))
    for name in SPLITS:
        assert before[name] <= after[name]
    assert sum(len(s) for s in after.values()) == 41


def test_directory_corpus_reads_text_files_only(tmp_path):
    _write_tree(tmp_path, 12)
    (tmp_path / "notes.md").write_text("# notes\n")
    (tmp_path / "empty.py").write_text("  \n")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config.txt").write_text("hidden")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "x.py").write_text("cached")
    corpus = load_corpus(str(tmp_path))
    every = set().union(*_ids(corpus).values())
    assert "notes.md" in every and "pkg1/mod_4.py" in every
    assert len(every) == 13  # 12 modules + notes; empty, binary, hidden and cache skipped
    doc = next(d for s in SPLITS for d in corpus.split(s) if d.id == "pkg1/mod_4.py")
    assert doc.text == "def f4(x):\n    return x * 4\n"
    assert corpus.source["kind"] == "directory"


def test_single_file_is_cut_into_line_chunks(tmp_path):
    text = "".join(f"line {i}\n" for i in range(1000))
    (tmp_path / "big.txt").write_text(text)
    corpus = load_corpus(str(tmp_path / "big.txt"))
    docs = [d for s in SPLITS for d in corpus.split(s)]
    assert len(docs) == 5 and all(corpus.split(s) for s in SPLITS)
    docs.sort(key=lambda d: int(d.id.split("#")[1]))
    assert "".join(d.text for d in docs) == text


def test_tiny_corpus_falls_back_to_one_document_per_split(tmp_path):
    _write_tree(tmp_path, 3)
    corpus = load_corpus(str(tmp_path))
    assert [len(corpus.split(s)) for s in SPLITS] == [1, 1, 1]
    (tmp_path / "pkg2" / "mod_2.py").unlink()
    with pytest.raises(NnobsError, match="has 2 non-empty document"):
        load_corpus(str(tmp_path))


def test_bad_corpus_paths_raise(tmp_path):
    with pytest.raises(NnobsError, match="not found"):
        load_corpus(str(tmp_path / "missing"))
    (tmp_path / "data.bin").write_bytes(b"\x00")
    with pytest.raises(NnobsError, match="has no text files"):
        load_corpus(str(tmp_path))
    for i in range(3):
        (tmp_path / f"{i}.py").write_text("\n")
    with pytest.raises(NnobsError, match="is empty"):
        load_corpus(str(tmp_path))


def test_bad_arguments_raise(tmp_path):
    _write_tree(tmp_path, 6)
    with pytest.raises(NnobsError, match="fractions"):
        load_corpus(str(tmp_path), fractions=(0.5, 0.5, 0.0))
    with pytest.raises(NnobsError, match="max_chars"):
        load_corpus(str(tmp_path), max_chars=0)
    with pytest.raises(NnobsError, match="unknown split"):
        load_corpus(str(tmp_path)).split("dev")
    with pytest.raises(NnobsError, match="not found"):
        load_corpus("no-such-corpus")


def test_max_chars_caps_each_split_by_its_fraction():
    full = load_corpus("stdlib")
    capped = load_corpus("stdlib", max_chars=100_000)
    for name, fraction in zip(SPLITS, (0.8, 0.1, 0.1), strict=True):
        docs, ref = capped.split(name), full.split(name)
        assert docs and sum(len(d.text) for d in docs) == int(100_000 * fraction)
        assert [d.id for d in docs] == [d.id for d in ref[: len(docs)]]
        assert docs[-1].text == ref[len(docs) - 1].text[: len(docs[-1].text)]
    assert capped.source["n_chars"] == 100_000


def test_fingerprint_tracks_content():
    docs = [Document("a", "x"), Document("b", "y")]
    assert docs_fingerprint(docs) == docs_fingerprint(list(docs))
    assert docs_fingerprint(docs) != docs_fingerprint([Document("a", "x"), Document("b", "z")])
    # Moving characters between id and text must change it too.
    assert docs_fingerprint([Document("ab", "c")]) != docs_fingerprint([Document("a", "bc")])


def _texts(n: int) -> list[str]:
    return [f"def f{i}():\n    return {i}  # row {i}\n" for i in range(n)]


def test_saved_hf_dataset_loads(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = _texts(20)
    rows = {"label": list(range(20)), "content": texts}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    for spec in (str(tmp_path / "ds"), f"hf:{tmp_path / 'ds'}"):
        corpus = load_corpus(spec)
        docs = {d.id: d.text for s in SPLITS for d in corpus.split(s)}
        assert docs == {f"hf:ds/{i}": t for i, t in enumerate(texts)}
        assert corpus.source["kind"] == "hf-disk" and corpus.source["text_column"] == "content"

    split = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": texts[:10]}),
        validation=datasets.Dataset.from_dict({"text": texts[10:]}),
    )
    split.save_to_disk(str(tmp_path / "dd"))
    train = load_corpus(f"hf:{tmp_path / 'dd'}")
    assert {d.text for s in SPLITS for d in train.split(s)} == set(texts[:10])
    other = load_corpus(f"hf:{tmp_path / 'dd'}@validation")
    assert {d.text for s in SPLITS for d in other.split(s)} == set(texts[10:])
    with pytest.raises(NnobsError, match="no split 'dev'"):
        load_corpus(f"hf:{tmp_path / 'dd'}@dev")


def test_json_data_files_load_with_text_column(tmp_path):
    pytest.importorskip("datasets")
    texts = _texts(12)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"n": i, "body": t}) + "\n" for i, t in enumerate(texts)))
    corpus = load_corpus(str(path))  # first string column
    assert sorted(d.text for s in SPLITS for d in corpus.split(s)) == sorted(texts)
    assert corpus.source["text_column"] == "body" and corpus.source["kind"] == "hf-files"
    assert load_corpus(f"hf:{path}", text_column="body").fingerprint == corpus.fingerprint
    with pytest.raises(NnobsError, match="no column 'text'"):
        load_corpus(f"hf:{path}", text_column="text")


def test_unreachable_hub_dataset_raises_one_line(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'owner/name' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    for spec in ("owner/name", "hf:owner/name:cfg@train"):
        with pytest.raises(NnobsError, match="without network access") as err:
            load_corpus(spec)
        assert "\n" not in str(err.value) and "'owner/name'" in str(err.value)


class CountingBytes(ByteTokenizer):
    """The byte tokenizer, counting how many texts it was asked to encode."""

    def __init__(self):
        self.calls = 0

    def encode_batch(self, texts):
        self.calls += len(texts)
        return super().encode_batch(texts)


def test_token_stream_puts_eos_between_documents_and_caches(tmp_path):
    docs = [Document("a", "ab"), Document("b", "é"), Document("c", "z")]
    tok = CountingBytes()
    stream = token_stream(docs, tok, cache_dir=tmp_path)
    assert stream.dtype == np.int32
    assert stream.tolist() == [97, 98, 256, 0xC3, 0xA9, 256, 122]
    assert tok.calls == 3
    assert len(list(tmp_path.glob(f"tokens-{tok.fingerprint}-*.npz"))) == 1

    arrays = encode_documents(docs, tok, cache_dir=tmp_path)
    assert tok.calls == 3  # served from the cache file
    assert [a.tolist() for a in arrays] == [[97, 98], [0xC3, 0xA9], [122]]
    encode_documents(docs[:2], tok, cache_dir=tmp_path)
    assert tok.calls == 5  # other documents, other cache entry
    assert token_stream([], tok, cache_dir=tmp_path).shape == (0,)


def test_default_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("NNOBS_CACHE", str(tmp_path / "c"))
    encode_documents([Document("a", "hi")], ByteTokenizer())
    assert len(list((tmp_path / "c").glob("tokens-*.npz"))) == 1


@pytest.mark.parametrize(
    "ids, offsets",
    [
        ([97, 98, 9999], [0, 2, 3]),  # an id outside the byte vocabulary
        ([97, -1, 122], [0, 2, 3]),  # a negative id
        ([97, 98, 122], [0, 3]),  # offsets for another number of documents
        ([97, 98, 122], [0, 2, 7]),  # offsets past the end of the ids
        ([97, 98, 122], [0, 3, 2]),  # offsets going backwards
    ],
)
def test_a_token_cache_that_does_not_fit_is_encoded_again(tmp_path, ids, offsets):
    docs = [Document("a", "ab"), Document("b", "z")]
    tok = CountingBytes()
    encode_documents(docs, tok, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("tokens-*.npz")
    with open(entry, "wb") as f:
        np.savez(f, ids=np.array(ids, dtype=np.int32), offsets=np.array(offsets, dtype=np.int64))
    arrays = encode_documents(docs, tok, cache_dir=tmp_path)
    assert [a.tolist() for a in arrays] == [[97, 98], [122]] and tok.calls == 4
    encode_documents(docs, tok, cache_dir=tmp_path)
    assert tok.calls == 4  # the rewritten entry is served


def test_an_unreachable_hub_dataset_fails_at_once(tmp_path, python_run):
    """No network (the Hub's address refuses connections) and nothing cached: one line within
    seconds, where the Hub client alone retries for half a minute."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "NNOBS_HUB"))}
    env |= {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"),
            "NNOBS_CACHE": str(tmp_path / "cache")}  # fmt: skip
    argv = [sys.executable, "-m", "nnobs", "ablate", "--model", str(python_run),
            "--site", "blocks.0.mlp_out", "--corpus", "hf:nnobs-test/absent",
            "--out", str(tmp_path / "out")]  # fmt: skip
    start = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.monotonic() - start
    assert done.returncode == 2 and done.stderr.startswith("error: "), done.stderr
    assert done.stderr.count("\n") == 1 and "Retry" not in done.stderr, done.stderr
    assert "'nnobs-test/absent' is not in the local Hugging Face cache" in done.stderr
    assert elapsed < 20, f"{elapsed:.1f} s"  # retrying takes 24 s and more
    assert not (tmp_path / "out").exists()
