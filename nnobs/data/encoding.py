"""Documents to token ids: cached encodings and the flat token stream the trainer reads."""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from nnobs.core.files import atomic_path
from nnobs.data.corpus import Document, default_cache_dir, docs_fingerprint
from nnobs.data.tokenizer import Tokenizer


def encode_documents(
    docs: list[Document], tokenizer: Tokenizer, *, cache_dir: Path | None = None
) -> list[np.ndarray]:
    """One int32 array of token ids per document, without special tokens.

    Cached as ``<cache_dir>/tokens-<tokenizer fingerprint>-<documents fingerprint>.npz``
    (ids concatenated plus document offsets), so a second run skips the encoding.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"tokens-{tokenizer.fingerprint}-{docs_fingerprint(docs)}.npz"
    cached = _read_cache(path, len(docs), tokenizer.vocab_size) if path.is_file() else None
    if cached is not None:
        return cached
    arrays = []
    for batch in _batches(docs, chars=1_000_000):
        encoded = tokenizer.encode_batch([d.text for d in batch])
        arrays.extend(np.asarray(ids, dtype=np.int32) for ids in encoded)
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    ids = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, ids=ids, offsets=offsets)
    return _unpack(ids, offsets)


def _read_cache(path: Path, n_docs: int, vocab_size: int) -> list[np.ndarray] | None:
    """The cached encoding at ``path`` if it is whole and fits: ``n_docs`` documents, every id
    in the vocabulary. A damaged or edited entry reads as absent and is rewritten: an id out of
    range would fail deep inside a model's embedding instead."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            ids, offsets = stored["ids"], stored["offsets"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    fits = (
        ids.ndim == 1
        and ids.dtype == np.int32
        and offsets.shape == (n_docs + 1,)
        and offsets.dtype.kind == "i"
        and offsets[0] == 0
        and offsets[-1] == len(ids)
        and bool(np.all(np.diff(offsets) >= 0))
        and (len(ids) == 0 or (ids.min() >= 0 and ids.max() < vocab_size))
    )
    return _unpack(ids, offsets) if fits else None


def _unpack(ids: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [ids[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def _batches(docs: list[Document], chars: int) -> Iterable[list[Document]]:
    """Consecutive groups of about ``chars`` characters: bounds the encoder's memory."""
    batch: list[Document] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def token_stream(
    docs: list[Document], tokenizer: Tokenizer, *, cache_dir: Path | None = None
) -> np.ndarray:
    """The documents' tokens concatenated with ``tokenizer.eos_id`` between documents (int32)."""
    arrays = encode_documents(docs, tokenizer, cache_dir=cache_dir)
    if not arrays:
        return np.zeros(0, dtype=np.int32)
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    pieces = [arrays[0]]
    for array in arrays[1:]:
        pieces.extend((eos, array))
    return np.concatenate(pieces).astype(np.int32, copy=False)
