"""Token windows cut from documents: the one windowing policy every measurement on a corpus uses.

A window never crosses a document boundary, so every scored token is predicted from its own
document. :func:`document_windows` is the policy: a token budget spread evenly over a split's
documents (a seeded random span of each, at most the cap that still fills the budget), cut
into windows of ``seq_len`` inputs in a seeded random document order. :func:`held_out_splits`
chooses which documents a probe trains and is scored on. :func:`stream_windows` is the
trainer's view of a split (documents joined), for measurements of the training distribution.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nnobs.core.errors import NnobsError
from nnobs.data.corpus import SPLITS, Corpus, Document, load_corpus
from nnobs.data.encoding import encode_documents, token_stream
from nnobs.data.tokenizer import Tokenizer

# The window length when neither the caller nor the model's context says otherwise.
DEFAULT_SEQ_LEN = 256


@dataclass
class Windows:
    """Token windows cut from documents; no window crosses a document boundary.

    ``input_ids`` and ``targets`` are right-padded with id 0; ``targets[i, t]`` is the token
    after ``input_ids[i, t]``. Position t is valid iff token t and its target are real
    tokens of the same document (``valid`` is always a prefix of each row).
    """

    input_ids: np.ndarray  # (n_windows, seq_len) int64
    targets: np.ndarray  # (n_windows, seq_len) int64
    valid: np.ndarray  # (n_windows, seq_len) bool
    doc_ids: np.ndarray  # (n_windows,) int64: index of the source document
    starts: np.ndarray  # (n_windows,) int64: position of input_ids[:, 0] in its document

    @property
    def n_tokens(self) -> int:
        """Number of valid (scored) positions."""
        return int(self.valid.sum())

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def row_documents(self) -> np.ndarray:
        """(n_tokens,) the source document of each valid position, in row-major order."""
        return np.repeat(self.doc_ids, self.valid.sum(1))

    def row_positions(self) -> np.ndarray:
        """(n_tokens,) the position in its document of each valid position's input token."""
        return (self.starts[:, None] + np.arange(self.seq_len))[self.valid]

    def head(self, n_windows: int) -> Windows:
        """The first ``n_windows`` windows (a prefix keeps the tokens a full set starts with)."""
        first = slice(None, n_windows)
        return Windows(
            self.input_ids[first],
            self.targets[first],
            self.valid[first],
            self.doc_ids[first],
            self.starts[first],
        )


def make_windows(
    docs_tokens: list[np.ndarray],
    seq_len: int,
    max_tokens: int | None = None,
    seed: int = 0,
    split: str = "corpus",
) -> Windows:
    """Cut documents into windows of ``seq_len`` inputs (+1 target token each).

    Documents are taken in a seeded random order, each cut into consecutive windows of
    ``seq_len + 1`` tokens (consecutive windows share one token, so every token after a
    document's first is a target exactly once), until exactly ``max_tokens`` valid positions
    are collected (all of them when None). ``split`` only names the split in errors.
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise NnobsError(f"seq_len must be a positive integer, got {seq_len!r}")
    if max_tokens is not None and max_tokens < 1:
        raise NnobsError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    available = sum(max(len(d) - 1, 0) for d in docs_tokens)
    if max_tokens is not None and available < max_tokens:
        raise NnobsError(
            f"corpus too small: it has {available} tokens in split {split}, the budget needs "
            f"{max_tokens}; lower the budget (examples per dimension) or use a larger corpus"
        )
    if available == 0:
        raise NnobsError(f"split {split} has no document of two or more tokens to score")
    remaining = available if max_tokens is None else max_tokens
    pieces: list[tuple[int, int, np.ndarray, int]] = []  # (document, start, chunk, valid)
    for doc in np.random.default_rng(seed).permutation(len(docs_tokens)):
        tokens = np.asarray(docs_tokens[doc])
        for start in range(0, len(tokens) - 1, seq_len):
            chunk = tokens[start : start + seq_len + 1]
            n_valid = min(len(chunk) - 1, remaining)
            pieces.append((int(doc), start, chunk, n_valid))
            remaining -= n_valid
            if remaining == 0:
                break
        if remaining == 0:
            break

    n = len(pieces)
    input_ids = np.zeros((n, seq_len), dtype=np.int64)
    targets = np.zeros((n, seq_len), dtype=np.int64)
    valid = np.zeros((n, seq_len), dtype=bool)
    for row, (_, _, chunk, n_valid) in enumerate(pieces):
        inputs = chunk[:seq_len]
        input_ids[row, : len(inputs)] = inputs
        targets[row, : len(chunk) - 1] = chunk[1:]
        valid[row, :n_valid] = True
    doc_ids = np.array([doc for doc, _, _, _ in pieces], dtype=np.int64)
    starts = np.array([start for _, start, _, _ in pieces], dtype=np.int64)
    return Windows(input_ids, targets, valid, doc_ids, starts)


def window_length(context: int | None, requested: int | None) -> int:
    """The window length: ``requested`` if the model's ``context`` (tokens; None when unknown)
    holds it, else the context up to :data:`DEFAULT_SEQ_LEN`."""
    if requested is not None:
        if context and requested > context:
            raise NnobsError(f"seq_len {requested} exceeds the model's context of {context} tokens")
        return requested
    return int(min(context or DEFAULT_SEQ_LEN, DEFAULT_SEQ_LEN))


def document_spans(tokens: list[np.ndarray], max_tokens: int, seed: int) -> list[np.ndarray]:
    """A seeded random contiguous span of at most ``max_tokens`` scored tokens per document.

    Spreads a small token budget over many documents (more independent clusters for the
    bootstrap) without favouring their openings (licence headers, imports).
    """
    out = []
    for i, ids in enumerate(tokens):
        extra = len(ids) - (max_tokens + 1)
        start = int(np.random.default_rng([seed, i]).integers(0, extra + 1)) if extra > 0 else 0
        out.append(ids[start : start + max_tokens + 1])
    return out


def even_cap(tokens: list[np.ndarray], budget: int, slack: float = 1.1) -> int | None:
    """The smallest per-document token cap that still leaves ``budget`` scored tokens.

    Taking whole files would fill the budget from a handful of long documents (a stdlib split
    of 44.8k tokens came from 6 files), so the probe would learn those files and the cluster
    bootstrap would have almost no clusters. Capping every document at the water level spreads
    the budget over as many documents as the split has. ``slack`` leaves room for the windows'
    rounding; None when even whole documents do not reach the budget (the window builder then
    reports the shortfall).
    """
    scored = np.sort(np.array([max(len(t) - 1, 0) for t in tokens], dtype=np.int64))
    goal = int(budget * slack)
    if scored.sum() < goal:
        return None if scored.sum() < budget else int(scored[-1])
    # sum(min(scored, c)) >= goal for the smallest c: walk the sorted lengths.
    below = 0
    for i, length in enumerate(scored):
        remaining = len(scored) - i
        if below + length * remaining >= goal:
            return int(np.ceil((goal - below) / remaining))
        below += length
    return int(scored[-1])


def document_windows(
    docs: list[Document],
    tokenizer: Tokenizer,
    seq_len: int,
    budget: int,
    *,
    seed: int = 0,
    max_doc_tokens: int | None = None,
    split: str = "corpus",
    cache_dir: Path | None = None,
) -> Windows:
    """Windows of ``budget`` scored tokens of ``docs``, at most ``max_doc_tokens`` from any one
    document (a random span of it); by default the cap that spreads the budget over every
    document (:func:`even_cap`)."""
    ids = encode_documents(docs, tokenizer, cache_dir=cache_dir)
    cap = max_doc_tokens if max_doc_tokens is not None else even_cap(ids, budget)
    tokens = ids if cap is None else document_spans(ids, cap, seed)
    return make_windows(tokens, seq_len, max_tokens=budget, seed=seed, split=split)


def split_windows(
    docs: dict[str, list[Document]],
    tokenizer: Tokenizer,
    seq_len: int,
    budget: int,
    *,
    seed: int = 0,
    max_doc_tokens: int | None = None,
) -> dict[str, Windows]:
    """:func:`document_windows` of each split, at the same budget."""
    return {
        split: document_windows(
            split_docs,
            tokenizer,
            seq_len,
            budget,
            seed=seed,
            max_doc_tokens=max_doc_tokens,
            split=split,
        )
        for split, split_docs in docs.items()
    }


def _half(doc: Document) -> int:
    return hashlib.sha256(doc.id.encode()).digest()[0] & 1


def held_out_splits(corpus: Corpus, model_saw_train: bool) -> tuple[dict[str, list], str]:
    """Documents for a probe's train/validation/test splits, and the policy used.

    When the model was trained on the corpus's training split, the probe never sees those
    documents: probe-train and probe-validation are the two halves (by document) of the
    corpus's validation split, and the test split is the corpus's test split.
    """
    if not model_saw_train:
        return {s: corpus.split(s) for s in SPLITS}, "corpus splits"
    val = corpus.validation
    train = [d for d in val if _half(d) == 0]
    validation = [d for d in val if _half(d) == 1]
    if not train or not validation:
        raise NnobsError(
            "the corpus's validation split is too small to hold out two halves from the "
            "model's training text; use a larger corpus"
        )
    policy = "model trained on this corpus: probe train/validation = halves of its validation split"
    return {"train": train, "validation": validation, "test": corpus.test}, policy


def stream_windows(
    tokenizer: Tokenizer, corpus: str, split: str, n_windows: int, length: int
) -> tuple[torch.Tensor, dict]:
    """The first ``n_windows`` consecutive windows of ``length`` tokens of a corpus split's
    token stream, and where they came from (for results and the mean cache).

    The one exception to the document policy, on purpose: these are windows as the trainer
    reads them (documents joined by end-of-text), the pretraining distribution that component
    ablation takes its means over and measures loss on.
    """
    if n_windows < 1 or length < 2:
        raise NnobsError("need at least one window of at least 2 tokens")
    loaded = load_corpus(corpus)
    stream = token_stream(loaded.split(split), tokenizer)
    if len(stream) < n_windows * length:
        raise NnobsError(
            f"the {split} split of {corpus!r} has {len(stream)} tokens, fewer than "
            f"{n_windows} windows of {length}: ask for fewer or shorter windows"
        )
    windows = torch.from_numpy(stream[: n_windows * length].astype(np.int64)).view(n_windows, -1)
    info = {"corpus": corpus, "fingerprint": loaded.fingerprint, "split": split}
    return windows, info
