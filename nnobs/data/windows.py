"""Token windows cut from documents: the one windowing policy every measurement on a corpus uses.

A window never crosses a document boundary, so every scored token is predicted from its own
document. :func:`document_windows` is the policy: a token budget spread evenly over a split's
documents (a seeded random span of each, at most the cap that still fills the budget), cut
into windows of ``seq_len`` inputs in a seeded random document order; the reference method's
sampling (the openings of the shortest documents, :func:`opening_windows`) is the other
choice. For a tokenizer that starts its inputs with a BOS token (Llama, Gemma, Mistral), every
window starts with it, as the model saw in training. :func:`held_out_splits`
chooses which documents a probe trains and is scored on. :func:`stream_windows` is the
trainer's view of a split (documents joined), for measurements of the training distribution.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
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
    after ``input_ids[i, t]``. Position t is valid (scored) iff token t and its target are real
    tokens of the same document (``valid`` is a contiguous run of each row: a prefix, or from
    column 1 where the window starts with a BOS token whose row is not scored).
    ``starts[i]`` is the position in its document of ``input_ids[i, 0]``, a BOS counting as
    the position before the window's first document token (-1 at a document's opening).
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

    def attention_mask(self) -> np.ndarray:
        """(n_windows, seq_len) bool: the columns a forward pass attends to (see
        :func:`attention_mask`)."""
        return attention_mask(self.valid)

    def row_documents(self) -> np.ndarray:
        """(n_tokens,) the source document of each valid position, in row-major order."""
        return np.repeat(self.doc_ids, self.valid.sum(1))

    def row_positions(self) -> np.ndarray:
        """(n_tokens,) the position in its document of each valid position's input token (-1
        for a scored BOS row: its input is the BOS before the document)."""
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


def attention_mask(valid: np.ndarray) -> np.ndarray:
    """The columns of windows with scored positions ``valid`` that a forward pass attends to:
    every one up to the last scored position, so a BOS before the first scored position is
    included (equal to ``valid`` where a window has no BOS)."""
    last = valid.shape[1] - 1 - np.argmax(valid[:, ::-1], axis=1)
    return np.arange(valid.shape[1])[None, :] <= last[:, None]


def make_windows(
    docs_tokens: list[np.ndarray],
    seq_len: int,
    max_tokens: int | None = None,
    seed: int = 0,
    split: str = "corpus",
    *,
    bos: int | None = None,
) -> Windows:
    """Cut documents into windows of ``seq_len`` inputs (+1 target token each).

    Documents are taken in a seeded random order, each cut into consecutive windows of
    ``seq_len + 1`` tokens (consecutive windows share one token, so every token after a
    document's first is a target exactly once), until exactly ``max_tokens`` valid positions
    are collected (all of them when None). ``split`` only names the split in errors.

    With ``bos`` (the token a model's inputs start with, for tokenizers that add one), every
    window starts with it and holds ``seq_len - 1`` document tokens. The BOS is context, never
    a target, and its own row is not scored: in a causal model position 0 sees only itself, so
    that row's activation, norm and confidence are the same in every window and tell a probe
    nothing. The scored positions are then exactly those of windows of ``seq_len - 1`` inputs
    without BOS, each shifted one column right.
    """
    _check_request(seq_len, max_tokens, bos)
    order = np.random.default_rng(seed).permutation(len(docs_tokens))
    return _cut(docs_tokens, order, seq_len, max_tokens, split, bos, score_openings=False)


# Tokens of each document the reference method encodes (BOS included) when it samples.
REFERENCE_OPENING = 512


def opening_windows(
    docs_tokens: list[np.ndarray],
    seq_len: int,
    max_tokens: int,
    *,
    bos: int | None = None,
    opening: int = REFERENCE_OPENING,
    split: str = "corpus",
) -> Windows:
    """The reference method's token sampling: the openings of the shortest documents.

    The reference encodes every document truncated to its first ``opening`` tokens (BOS
    included when the tokenizer adds one), drops encodings shorter than 2 tokens, sorts them
    by length (shortest first; a stable sort, so ties keep the split's order), and scores
    their positions in that order until ``max_tokens`` are collected (the last document cut
    short). With ``bos`` the row predicting a document's first token from BOS is scored, as
    the reference scores it (its mask keeps every position whose next token is real); the BOS
    itself is never a target. An opening longer than ``seq_len`` is cut into consecutive
    windows as :func:`make_windows` cuts a document (each starting with BOS), so with
    ``seq_len >= opening`` every opening is one window, as in the reference.
    """
    _check_request(seq_len, max_tokens, bos)
    if opening < 2:
        raise NnobsError(f"opening must be at least 2 tokens, got {opening!r}")
    lead = int(bos is not None)
    heads = [np.asarray(tokens)[: opening - lead] for tokens in docs_tokens]
    order = sorted(
        (i for i, h in enumerate(heads) if len(h) + lead >= 2), key=lambda i: len(heads[i])
    )
    return _cut(heads, order, seq_len, max_tokens, split, bos, score_openings=lead == 1)


def _check_request(seq_len: int, max_tokens: int | None, bos: int | None) -> None:
    if not isinstance(seq_len, int) or seq_len < 1 + int(bos is not None):
        least = "at least 2 (BOS and a token)" if bos is not None else "a positive integer"
        raise NnobsError(f"seq_len must be {least}, got {seq_len!r}")
    if max_tokens is not None and max_tokens < 1:
        raise NnobsError(f"max_tokens must be a positive integer, got {max_tokens!r}")


def _cut(
    docs_tokens: list[np.ndarray],
    order: Iterable[int],
    seq_len: int,
    max_tokens: int | None,
    split: str,
    bos: int | None,
    score_openings: bool,
) -> Windows:
    """Windows of the documents in ``order`` (see :func:`make_windows`); ``score_openings``
    (with ``bos`` only) also scores each document's first token, predicted from BOS."""
    order = [int(doc) for doc in order]
    lead = int(bos is not None)  # columns before a window's first document token
    inner = seq_len - lead  # document tokens a window holds as inputs
    opening = int(score_openings)
    lengths = [len(docs_tokens[doc]) for doc in order]
    available = sum(max(n - 1, 0) + (opening if n else 0) for n in lengths)
    if max_tokens is not None and available < max_tokens:
        raise NnobsError(
            f"corpus too small: it has {available} tokens in split {split}, the budget needs "
            f"{max_tokens}; lower the budget (examples per dimension) or use a larger corpus"
        )
    if available == 0:
        raise NnobsError(f"split {split} has no document of two or more tokens to score")
    remaining = available if max_tokens is None else max_tokens
    pieces: list[tuple[int, int, np.ndarray, int, int]] = []  # document, start, chunk, first, valid
    for doc in order:
        tokens = np.asarray(docs_tokens[doc])
        for start in range(0, max(len(tokens) - 1, opening), inner):
            chunk = tokens[start : start + inner + 1]
            scored_bos = opening if start == 0 else 0
            n_valid = min(len(chunk) - 1 + scored_bos, remaining)
            pieces.append((doc, start, chunk, lead - scored_bos, n_valid))
            remaining -= n_valid
            if remaining == 0:
                break
        if remaining == 0:
            break

    n = len(pieces)
    input_ids = np.zeros((n, seq_len), dtype=np.int64)
    targets = np.zeros((n, seq_len), dtype=np.int64)
    valid = np.zeros((n, seq_len), dtype=bool)
    for row, (_, _, chunk, first, n_valid) in enumerate(pieces):
        inputs = chunk[:inner]
        if bos is not None:
            input_ids[row, 0] = bos
        input_ids[row, lead : lead + len(inputs)] = inputs
        # Column c predicts chunk[c + 1 - lead]: with BOS, column 0 predicts the chunk's first.
        targets[row, : len(chunk) - 1 + lead] = chunk[1 - lead :]
        valid[row, first : first + n_valid] = True
    doc_ids = np.array([doc for doc, _, _, _, _ in pieces], dtype=np.int64)
    starts = np.array([start - lead for _, start, _, _, _ in pieces], dtype=np.int64)
    return Windows(input_ids, targets, valid, doc_ids, starts)


def window_length(
    context: int | None, requested: int | None, default: int = DEFAULT_SEQ_LEN
) -> int:
    """The window length: ``requested`` if the model's ``context`` (tokens; None when unknown)
    holds it, else the context up to ``default``."""
    if requested is not None:
        if context and requested > context:
            raise NnobsError(f"seq_len {requested} exceeds the model's context of {context} tokens")
        return requested
    return int(min(context or default, default))


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


# How a split's token budget is drawn from its documents: "spread", random spans of every
# document (:func:`document_spans` at :func:`even_cap`); "reference", the reference method's
# openings of the shortest documents (:func:`opening_windows`).
SAMPLINGS = ("spread", "reference")


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
    bos: int | None = None,
    sampling: str = "spread",
) -> Windows:
    """Windows of ``budget`` scored tokens of ``docs``, each starting with ``bos`` if given.

    ``sampling="spread"``: at most ``max_doc_tokens`` from any one document (a random span of
    it), by default the cap that spreads the budget over every document (:func:`even_cap`).
    ``sampling="reference"``: the openings of the shortest documents (:func:`opening_windows`),
    whose opening is its own cap, so ``max_doc_tokens`` does not apply.
    """
    if sampling not in SAMPLINGS:
        raise NnobsError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    ids = encode_documents(docs, tokenizer, cache_dir=cache_dir)
    if sampling == "reference":
        return opening_windows(ids, seq_len, budget, bos=bos, split=split)
    cap = max_doc_tokens if max_doc_tokens is not None else even_cap(ids, budget)
    tokens = ids if cap is None else document_spans(ids, cap, seed)
    return make_windows(tokens, seq_len, max_tokens=budget, seed=seed, split=split, bos=bos)


def split_windows(
    docs: dict[str, list[Document]],
    tokenizer: Tokenizer,
    seq_len: int,
    budget: int,
    *,
    seed: int = 0,
    max_doc_tokens: int | None = None,
    bos: int | None = None,
    sampling: str = "spread",
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
            bos=bos,
            sampling=sampling,
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
