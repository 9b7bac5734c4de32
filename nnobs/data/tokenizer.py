"""Tokenizers behind one small interface: byte-level BPE trained on a corpus, raw bytes, or
a wrapped Hugging Face tokenizer.

Every kind round-trips text exactly (``decode(encode(s)) == s``) and encodes
deterministically, and each carries a fingerprint of its exact vocabulary so cached token
arrays and saved runs can tell which tokenizer produced them.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from nnobs.core.errors import NnobsError
from nnobs.core.files import write_text
from nnobs.data.corpus import Corpus, Document, default_cache_dir, docs_fingerprint
from nnobs.data.python_tasks import ANSWER_PIECES

EOS = "<|endoftext|>"
# Bump when the BPE recipe below changes, so cached tokenizers trained the old way are not
# reused.
BPE_RECIPE = "bytelevel-bpe-v1"
# Training text cap: the split is in hash order, so its prefix is a deterministic sample.
# The stdlib's ~9.5 M training characters fit under it (about 2 s to train at 4096).
BPE_TRAIN_CHARS = 50_000_000


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _piece(data: bytes) -> str:
    """Bytes as readable text; bytes that are not whole UTF-8 characters shown as \\xNN."""
    return data.decode("utf-8", errors="backslashreplace")


class Tokenizer(ABC):
    """The only tokenizer interface the rest of nnobs uses."""

    vocab_size: int
    eos_id: int
    kind: str  # "bpe" | "byte" | "hf"
    fingerprint: str  # short hex identifying the exact vocabulary (and merges)
    # The token the model's inputs start with, for tokenizers that add one (Llama, Gemma,
    # Mistral); None for nnobs's own tokenizers and GPT-2-style ones, which add none.
    bos_id: int | None = None

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens added."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def token_str(self, id: int) -> str:
        """The text of one token, for plot labels (partial characters shown as \\xNN)."""

    def reference(self) -> dict:
        """JSON-able description that ``load_tokenizer`` can reload from."""
        return {
            "kind": self.kind,
            "path": None,
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
        }

    @abstractmethod
    def save(self, directory: Path) -> dict:
        """Write the tokenizer into ``directory``; return a reference pointing there."""

    def __repr__(self) -> str:
        return f"<{self.kind} tokenizer, vocab {self.vocab_size}, {self.fingerprint}>"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0-255 and eos as 256: no training, lossless for any text."""

    kind = "byte"
    vocab_size = 257
    eos_id = 256
    fingerprint = _short_hash("byte-v1")

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        out, run = [], bytearray()
        for i in ids:
            if i == self.eos_id:
                out.extend((run.decode("utf-8", errors="replace"), EOS))
                run.clear()
            else:
                run.append(i)
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_str(self, id: int) -> str:
        return EOS if id == self.eos_id else _piece(bytes([id]))

    def save(self, directory: Path) -> dict:
        return self.reference()  # nothing to write: the byte tokenizer has no parameters


class BPETokenizer(Tokenizer):
    """A ``tokenizers`` BPE tokenizer; ``path`` is the tokenizer.json it was loaded from."""

    kind = "bpe"

    def __init__(self, tok: tokenizers.Tokenizer, path: Path | None = None):
        eos = tok.token_to_id(EOS)
        if eos is None:
            raise NnobsError(
                f"tokenizer {str(path or '')!r} has no {EOS} token: nnobs BPE tokenizers use it "
                "as end of document; train one with train_bpe"
            )
        # Text that happens to contain "<|endoftext|>" is encoded as ordinary text, so only
        # the document boundaries that nnobs inserts are eos.
        tok.encode_special_tokens = True
        self._tok = tok
        self.path = path
        self.eos_id = eos
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.fingerprint = _tokenizers_fingerprint(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_str(self, id: int) -> str:
        token = self._tok.id_to_token(id)
        if token is None:
            raise NnobsError(f"token id {id} is outside the vocabulary of {self.vocab_size}")
        byte_of = _byte_decoder()
        if id == self.eos_id or not all(c in byte_of for c in token):
            return self.decode([id])  # eos, or a tokenizer.json that is not byte-level
        return _piece(bytes(byte_of[c] for c in token))

    def reference(self) -> dict:
        return {**super().reference(), "path": str(self.path) if self.path else None}

    def save(self, directory: Path) -> dict:
        path = Path(directory) / "tokenizer.json"
        write_text(path, self._tok.to_str())
        self.path = path.resolve()
        return self.reference()


class HFTokenizer(Tokenizer):
    """A transformers tokenizer (slow or fast), used without adding special tokens; the BOS it
    adds by default (if any) is ``bos_id``, which windows put in front of every input."""

    kind = "hf"

    def __init__(self, hf_tokenizer: Any):
        if hf_tokenizer.eos_token_id is None:
            raise NnobsError(
                f"tokenizer {hf_tokenizer.name_or_path!r} has no eos token: nnobs needs one to "
                "separate documents; set tokenizer.eos_token before wrapping it"
            )
        self._hf = hf_tokenizer
        self.eos_id = int(hf_tokenizer.eos_token_id)
        self.bos_id = _added_bos(hf_tokenizer)
        self.vocab_size = len(hf_tokenizer)
        self.path = hf_tokenizer.name_or_path or None
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is not None:
            self.fingerprint = _tokenizers_fingerprint(backend)
        else:
            vocab = sorted(hf_tokenizer.get_vocab().items(), key=lambda kv: kv[1])
            self.fingerprint = _short_hash(json.dumps([type(hf_tokenizer).__name__, vocab]))

    def encode(self, text: str) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self._hf(texts, add_special_tokens=False)["input_ids"]]

    def decode(self, ids: list[int]) -> str:
        return self._hf.decode(
            list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def token_str(self, id: int) -> str:
        return self.decode([id])

    def reference(self) -> dict:
        return {**super().reference(), "path": self.path}

    def save(self, directory: Path) -> dict:
        self._hf.save_pretrained(str(directory))
        self.path = str(Path(directory).resolve())
        return self.reference()


def _added_bos(hf_tokenizer: Any) -> int | None:
    """The BOS id if the tokenizer puts it in front of an encoding by default, else None.

    Asked of the tokenizer's behaviour, not its settings: a ``bos_token`` alone says nothing
    (GPT-2 declares one and never adds it), and families switch it on differently
    (``add_bos_token``, a template post-processor).
    """
    bos = hf_tokenizer.bos_token_id
    if bos is None:
        return None
    plain = hf_tokenizer("a", add_special_tokens=False)["input_ids"]
    special = hf_tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if special[:1] == [bos] and special[1:][: len(plain)] == plain else None


def _tokenizers_fingerprint(tok: tokenizers.Tokenizer) -> str:
    """Hash of the canonical JSON of the whole pipeline (vocabulary, merges, pre-tokenizer)."""
    return _short_hash(json.dumps(json.loads(tok.to_str()), sort_keys=True))


@cache
def _byte_decoder() -> dict[str, int]:
    """The ByteLevel pre-tokenizer's printable stand-in character -> the byte it stands for.

    Printable Latin-1 bytes stand for themselves; the others are shifted to 256 + n in order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in printable]
    mapping = {chr(b): b for b in printable}
    mapping.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return mapping


def byte_tokenizer() -> Tokenizer:
    """256 byte ids plus eos (vocabulary 257): no training, lossless."""
    return ByteTokenizer()


def _train(texts: list[str], vocab_size: int) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return tok


def _missing_merges(tok: tokenizers.Tokenizer, pieces: Sequence[str]) -> list[tuple[str, str]]:
    """The merges that make each of ``pieces`` one token, appended after ``tok``'s own: for
    a piece it splits into t1 t2 t3, the merges (t1, t2) and (t1t2, t3)."""
    vocab = tok.get_vocab()
    merges: list[tuple[str, str]] = []
    made: set[str] = set()
    for piece in pieces:
        if len(tok.pre_tokenizer.pre_tokenize_str(piece)) != 1:
            raise NnobsError(
                f"{piece!r} cannot be one token: the byte-level pre-tokenizer splits it"
            )
        parts = tok.encode(piece, add_special_tokens=False).tokens
        joined = parts[0]
        for part in parts[1:]:
            if joined + part not in vocab and joined + part not in made:
                merges.append((joined, part))
                made.add(joined + part)
            joined += part
    return merges


def _with_merges(tok: tokenizers.Tokenizer, merges: list[tuple[str, str]]) -> tokenizers.Tokenizer:
    """``tok`` with ``merges`` appended, each result a new token at the end of the vocabulary
    (ranked after every learnt merge, so text without these pairs encodes as before)."""
    data = json.loads(tok.to_str())
    model = data["model"]
    as_strings = bool(model["merges"]) and isinstance(model["merges"][0], str)
    next_id = tok.get_vocab_size(with_added_tokens=True)
    for left, right in merges:
        model["vocab"][left + right] = next_id
        next_id += 1
        model["merges"].append(f"{left} {right}" if as_strings else [left, right])
    return tokenizers.Tokenizer.from_str(json.dumps(data))


def _train_reserving(
    texts: list[str], vocab_size: int, reserved: Sequence[str]
) -> tokenizers.Tokenizer:
    """BPE of at most ``vocab_size`` tokens in which every string of ``reserved`` is one
    token: trained on fewer tokens by as many as the reserved strings still need."""
    tok = _train(texts, vocab_size)
    extra = len(_missing_merges(tok, reserved))
    while extra:
        if vocab_size - extra < 257:
            raise NnobsError(
                f"BPE vocab_size {vocab_size} is too small to keep {len(reserved)} reserved "
                f"pieces as single tokens: they need {extra} more tokens than 257"
            )
        tok = _train(texts, vocab_size - extra)
        merges = _missing_merges(tok, reserved)
        if len(merges) <= extra:
            tok = _with_merges(tok, merges)
            break
        extra = len(merges)
    split = [p for p in reserved if len(tok.encode(p, add_special_tokens=False).ids) != 1]
    if split:  # reserved pieces whose merges compete: a recipe error, never a user's
        raise NnobsError(f"reserved pieces {split!r} are not single tokens after training")
    return tok


def train_bpe(
    docs: list[Document],
    vocab_size: int = 4096,
    *,
    cache_dir: Path | None = None,
    reserved: Sequence[str] = (),
) -> Tokenizer:
    """Byte-level BPE with ``<|endoftext|>`` as eos, trained on ``docs``.

    Cached as ``<cache_dir>/bpe-<key>.json``, the key hashing the documents, the vocabulary
    size and the recipe, so a second call with the same inputs loads instead of training.
    Only the first ``BPE_TRAIN_CHARS`` characters are trained on. On a small corpus the
    vocabulary can end up smaller than ``vocab_size``; ``vocab_size`` on the result is exact.
    Each string of ``reserved`` (each must be one pre-token: no word joined to punctuation)
    is made one token by merges ranked after the learnt ones, the learnt vocabulary
    shrinking to make room.
    """
    if vocab_size < 257:
        raise NnobsError(
            f"BPE vocab_size {vocab_size} is too small: it needs at least 257 "
            "(256 byte tokens and eos)"
        )
    texts, total = [], 0
    for doc in docs:
        if total >= BPE_TRAIN_CHARS:
            break
        texts.append(doc.text[: BPE_TRAIN_CHARS - total])
        total += len(texts[-1])
    if not total:
        raise NnobsError("cannot train a BPE tokenizer on no text: the training split is empty")
    key_parts = [BPE_RECIPE, tokenizers.__version__, str(vocab_size), str(BPE_TRAIN_CHARS)]
    if reserved:  # only then: the keys of existing cached tokenizers stay as they were
        key_parts.append(json.dumps(sorted(set(reserved))))
    key = _short_hash("|".join([*key_parts, docs_fingerprint(docs)]))
    path = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / f"bpe-{key}.json"
    if path.is_file():
        try:
            return BPETokenizer(tokenizers.Tokenizer.from_file(str(path)), path)
        except Exception:  # a damaged cache file (the Rust loader raises plain Exception)
            pass  # retrained and rewritten below
    tok = _train_reserving(texts, vocab_size, sorted(set(reserved)))
    write_text(path, tok.to_str())
    return BPETokenizer(tok, path)


def get_tokenizer(
    kind: str, corpus: Corpus, vocab_size: int, cache_dir: Path | None = None
) -> Tokenizer:
    """``"bpe"``: BPE trained on the corpus's training split; ``"bpe_tasks"``: the same with
    every answer of the Python tasks one token (:data:`~nnobs.data.python_tasks.ANSWER_PIECES`);
    ``"byte"``: raw bytes."""
    if kind in ("bpe", "bpe_tasks"):
        reserved = ANSWER_PIECES if kind == "bpe_tasks" else ()
        return train_bpe(corpus.train, vocab_size, cache_dir=cache_dir, reserved=reserved)
    if kind == "byte":
        return byte_tokenizer()
    raise NnobsError(f"unknown tokenizer kind {kind!r}: use 'bpe', 'bpe_tasks' or 'byte'")


def load_tokenizer(reference_or_dir: dict | Path | str) -> Tokenizer:
    """Reload a tokenizer from a ``reference()`` dict, a directory, or a tokenizer.json.

    A directory holding ``tokenizer_config.json`` (written by transformers) is loaded with
    ``AutoTokenizer``; otherwise its ``tokenizer.json`` is a BPE tokenizer. A reference's
    fingerprint must match what is loaded.
    """
    if isinstance(reference_or_dir, dict):
        ref = reference_or_dir
        kind = ref.get("kind")
        if kind == "byte":
            tok: Tokenizer = byte_tokenizer()
        elif kind in ("bpe", "hf") and ref.get("path"):
            tok = _load_bpe(Path(ref["path"])) if kind == "bpe" else _load_hf(ref["path"])
        else:
            raise NnobsError(
                f"tokenizer reference {ref!r} cannot be reloaded: it needs kind 'byte', "
                "or kind 'bpe'/'hf' with a path"
            )
        if ref.get("fingerprint") and ref["fingerprint"] != tok.fingerprint:
            raise NnobsError(
                f"tokenizer at {ref.get('path')!r} has fingerprint {tok.fingerprint}, but "
                f"{ref['fingerprint']} was recorded: the file changed since the run was saved"
            )
        return tok
    path = Path(reference_or_dir)
    if path.is_dir() and (path / "tokenizer_config.json").is_file():
        return _load_hf(str(path))
    return _load_bpe(path / "tokenizer.json" if path.is_dir() else path)


def _load_bpe(path: Path) -> Tokenizer:
    if not path.is_file():
        raise NnobsError(f"no tokenizer at {str(path)!r}: the file does not exist")
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust loader raises plain Exception for any bad file
        raise NnobsError(
            f"{str(path)!r} is not a tokenizer file: expected a tokenizer.json written by "
            "nnobs or the tokenizers library"
        ) from e
    return BPETokenizer(tok, path.resolve())


def _load_hf(name_or_path: str) -> Tokenizer:
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise NnobsError(
            f"cannot load a Hugging Face tokenizer from {name_or_path!r}: "
            "give a local directory written by save_pretrained"
        ) from e
    return from_hf(hf)


def from_hf(hf_tokenizer: Any) -> Tokenizer:
    """Wrap a transformers ``PreTrainedTokenizer(Fast)``; its eos token separates documents."""
    return HFTokenizer(hf_tokenizer)
