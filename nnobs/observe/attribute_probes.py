"""Attribute probes: what a layer linearly encodes about Python source, with exact labels.

The standard ``tokenize`` module labels every character of a Python file exactly, so these
properties need no annotation:

- ``token_type``: the lexical class of the token the character is in: name, keyword
  (``keyword.iskeyword``; soft keywords such as ``match`` count as names), op, number,
  string, comment, or whitespace (spaces, newlines, indentation, line continuations).
- ``bracket_depth``: how many ``( [ {`` enclose the character, capped at ``BRACKET_CAP``
  (the last class means "that many or more"). A bracket itself is at the depth outside it,
  so ``f(a)`` is 0 0 1 0.
- ``in_string``: inside a string literal, from its prefix and opening quote to its closing
  quote. An f-string counts whole, replacement fields included: Python 3.12+ tokenizes the
  fields into names and operators, and they are folded back into the string so labels are the
  same on every version (string type, and their brackets do not count towards depth).
- ``indent_level``: the block depth from INDENT/DEDENT, capped at ``INDENT_CAP``. A dedent
  takes effect at the start of its line, so a line's leading whitespace has that line's level;
  comment and blank lines keep the level of the block they sit in.

A model token gets the labels of its first character (byte-level tokens that start inside a
multi-byte character get that character's). Files that ``tokenize`` rejects (or that contain
error tokens, such as an unterminated string on Python 3.11) are skipped and counted, since
their labels would not be exact.

**Probes and the control task.** Per attribute and site, a multinomial logistic regression is
fit on training tokens and scored on held-out tokens (disjoint documents). Accuracy alone
overstates what a representation encodes: a probe can also succeed by memorising which
*token* it sees, because token identity often predicts the label. The control task (Hewitt &
Liang 2019) gives each token type (id) one random label, drawn from the real labels'
distribution, and fits the same probe to it; only memorising token identity helps there.
**Selectivity** = accuracy − control accuracy: high when the layer encodes the property
beyond what its token identity gives away, near 0 when the probe's success is explained by
the token identity alone, and negative when the layer makes token identity easier to read
than the property (typical of embeddings for context-dependent properties such as bracket
depth). A probe trained on shuffled labels (and scored on the real ones) shows what a probe
reaches with no information, next to the majority-class baseline.
"""

from __future__ import annotations

import io
import keyword
import os
import re
import tokenize
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nnobs.core.errors import NnobsError
from nnobs.data.corpus import Document
from nnobs.data.encoding import encode_documents
from nnobs.data.tokenizer import Tokenizer
from nnobs.measure.arrays import to_tensor
from nnobs.models.adapter import ModelAdapter
from nnobs.observe.capture import capture, make_windows
from nnobs.observe.protocol import window_length

TOKEN_TYPES = ("whitespace", "name", "keyword", "op", "number", "string", "comment")
BRACKET_CAP = 3
INDENT_CAP = 4
ATTRIBUTES = ("token_type", "bracket_depth", "in_string", "indent_level")
# Class names per attribute, index = label code.
CLASSES: dict[str, tuple[str, ...]] = {
    "token_type": TOKEN_TYPES,
    "bracket_depth": (*map(str, range(BRACKET_CAP)), f"{BRACKET_CAP}+"),
    "in_string": ("no", "yes"),
    "indent_level": (*map(str, range(INDENT_CAP)), f"{INDENT_CAP}+"),
}
_TYPE = {name: code for code, name in enumerate(TOKEN_TYPES)}
_SIMPLE = {tokenize.NUMBER: "number", tokenize.STRING: "string", tokenize.COMMENT: "comment"}
_OPENERS, _CLOSERS = "([{", ")]}"
# Python 3.12 splits f-strings (3.14 also t-strings) into START ... END tokens.
_STRING_START = {getattr(tokenize, f"{k}STRING_START", None) for k in "FT"} - {None}
_STRING_END = {getattr(tokenize, f"{k}STRING_END", None) for k in "FT"} - {None}
# A character split over tokens is rejoined over at most this many (UTF-8 has up to 4 bytes).
_MAX_GROUP = 8


class UntokenizableSource(NnobsError):
    """The text is not Python that ``tokenize`` reads exactly."""


class UnalignedTokens(NnobsError):
    """The tokenizer's pieces do not concatenate to the text, so tokens have no char spans."""


class _Labeller:
    """Fills the per-character label arrays front to back as tokens arrive."""

    def __init__(self, n: int):
        self.arrays = {
            "token_type": np.zeros(n, np.int8),
            "bracket_depth": np.zeros(n, np.int8),
            "in_string": np.zeros(n, np.int8),
            "indent_level": np.zeros(n, np.int8),
        }
        self.pos = self.depth = self.level = 0

    def fill(self, upto: int, kind: str = "whitespace", string: bool = False) -> None:
        if upto <= self.pos:
            return
        span = slice(self.pos, upto)
        self.arrays["token_type"][span] = _TYPE[kind]
        self.arrays["bracket_depth"][span] = min(self.depth, BRACKET_CAP)
        self.arrays["in_string"][span] = string
        self.arrays["indent_level"][span] = min(self.level, INDENT_CAP)
        self.pos = upto


def python_char_labels(source: str) -> dict[str, np.ndarray]:
    """Exact labels for every character of ``source``: attribute -> ``(len(source),)`` int8.

    Codes index :data:`CLASSES`. Raises :class:`UntokenizableSource` when ``tokenize`` fails.
    """
    n = len(source)
    line_starts = [0, *(m.end() for m in re.finditer("\n", source))]

    def offset(row: int, col: int) -> int:
        return min(line_starts[row - 1] + col, n) if row <= len(line_starts) else n

    out = _Labeller(n)
    nested = 0  # open f-strings (3.12+), whose inner tokens are folded into the string
    fstring_start = 0
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            start, end = offset(*tok.start), offset(*tok.end)
            if tok.type == tokenize.ERRORTOKEN:
                raise UntokenizableSource(
                    f"error token {tok.string!r} at line {tok.start[0]}: not valid Python"
                )
            if tok.type in _STRING_START:
                if nested == 0:
                    fstring_start = start
                nested += 1
            elif tok.type in _STRING_END:
                nested -= 1
                if nested == 0:
                    out.fill(fstring_start)
                    out.fill(end, "string", string=True)
            if nested or tok.type in _STRING_END:
                continue
            if tok.type == tokenize.DEDENT:
                out.fill(line_starts[min(tok.start[0], len(line_starts)) - 1])
                out.level -= 1
                continue
            out.fill(start)
            if tok.type == tokenize.INDENT:
                out.level += 1
                out.fill(end)
            elif tok.type == tokenize.NAME:
                out.fill(end, "keyword" if keyword.iskeyword(tok.string) else "name")
            elif tok.type == tokenize.OP:
                if tok.string in _CLOSERS:
                    out.depth = max(out.depth - 1, 0)
                out.fill(end, "op")
                if tok.string in _OPENERS:
                    out.depth += 1
            elif tok.type in _SIMPLE:
                out.fill(end, _SIMPLE[tok.type], string=tok.type == tokenize.STRING)
            else:  # NEWLINE, NL, ENDMARKER
                out.fill(end)
    except (tokenize.TokenError, SyntaxError) as e:  # IndentationError is a SyntaxError
        raise UntokenizableSource(f"not tokenizable as Python: {e}") from None
    out.fill(n)
    return out.arrays


def token_char_starts(
    tokenizer: Tokenizer,
    ids: Sequence[int],
    text: str,
    pieces: dict[int, str] | None = None,
) -> np.ndarray:
    """The character offset in ``text`` where each token of ``ids`` (``text`` encoded) starts.

    Works for any tokenizer whose tokens decode to consecutive pieces of the text (byte-level
    BPE, raw bytes): each token is decoded alone, and a character split over several tokens
    is decoded as a group, each token of the group starting at the character its first byte
    belongs to. ``pieces`` caches single-token decodes across calls. Raises
    :class:`UnalignedTokens` if the pieces do not rebuild the text.
    """
    pieces = {} if pieces is None else pieces
    ids = [int(i) for i in ids]
    starts = np.empty(len(ids), np.int64)
    p = i = 0
    while i < len(ids):
        if ids[i] not in pieces:
            pieces[ids[i]] = tokenizer.decode([ids[i]])
        piece = pieces[ids[i]]
        if text.startswith(piece, p):
            starts[i] = p
            p, i = p + len(piece), i + 1
            continue
        for j in range(i + 2, min(i + _MAX_GROUP, len(ids)) + 1):
            piece = tokenizer.decode(ids[i:j])
            if text.startswith(piece, p):
                break
        else:
            raise UnalignedTokens(
                f"token {i} ({ids[i]}) does not decode to the text at character {p}: "
                "attribute labels need a byte-level or byte tokenizer"
            )
        for k in range(i, j):
            starts[k] = p + len(tokenizer.decode(ids[i:k]).rstrip("\ufffd"))
        p, i = p + len(piece), j
    if p != len(text):
        raise UnalignedTokens(f"tokens cover {p} of {len(text)} characters")
    return np.minimum(starts, max(len(text) - 1, 0))


@dataclass
class AttributeData:
    """Activations of the captured tokens with their exact labels, row for row."""

    acts: dict[str, np.ndarray]  # site -> (n, d)
    labels: dict[str, np.ndarray]  # attribute -> (n,) int codes into CLASSES[attribute]
    token_ids: np.ndarray  # (n,) each row's input token: the control task's token type
    doc_ids: np.ndarray  # (n,) index into the documents passed in
    counts: dict[str, int] = field(default_factory=dict)  # documents used / skipped


def attribute_dataset(
    adapter: ModelAdapter,
    docs: Sequence[Document],
    sites: Sequence[str],
    max_tokens: int | None,
    seq_len: int | None = None,
    *,
    seed: int = 0,
    batch_size: int = 16,
    dtype=np.float32,
    directory: str | os.PathLike | None = None,
    progress: bool = False,
    cache_dir: Path | None = None,
    doc_tokens: int | None = None,
) -> AttributeData:
    """Capture ``sites`` on windows of ``docs`` and label each captured token exactly.

    Documents that do not tokenize as Python, or whose model tokens cannot be aligned to
    characters, are skipped and counted in ``counts``. Windows and capture are those of
    :mod:`nnobs.observe.capture` (``seed`` picks the document order, ``max_tokens`` caps the rows);
    ``seq_len`` defaults as in the observability protocol; ``cache_dir`` is where token
    arrays are cached (:func:`nnobs.data.corpus.encode_documents`). ``doc_tokens`` keeps only the
    first that many tokens of each document, so that a budget spreads over many files: label
    mixes differ a lot between files (a table of literals is all brackets and strings), and a
    few long files make a training and a test set that disagree.
    """
    tok = adapter.tokenizer
    if tok is None:
        raise NnobsError("the model has no tokenizer; load it from a directory that has one")
    length = window_length(adapter, seq_len)
    if doc_tokens is not None and doc_tokens < 2:
        raise NnobsError(f"doc_tokens must be at least 2, got {doc_tokens}")
    encoded = encode_documents(list(docs), tok, cache_dir=cache_dir)
    tokens = [t[:doc_tokens].astype(np.int64) for t in encoded]
    counts = {"documents": len(docs), "untokenizable": 0, "unaligned": 0}
    token_labels: dict[int, dict[str, np.ndarray]] = {}
    pieces: dict[int, str] = {}
    # Label only the documents the windows use (tokenize is slow on a whole corpus). A
    # document that cannot be labelled is emptied rather than removed, which keeps the
    # seeded document order, and the windows are cut again until all their documents are
    # labelled.
    while True:
        try:
            windows = make_windows(tokens, length, max_tokens, seed=seed, split="attributes")
        except NnobsError as e:
            skipped = counts["untokenizable"] + counts["unaligned"]
            if not skipped:
                raise
            raise NnobsError(
                f"{e} ({counts['untokenizable']} documents not tokenizable as Python and "
                f"{counts['unaligned']} not alignable to the tokenizer were skipped)"
            ) from None
        new = [int(d) for d in np.unique(windows.doc_ids) if int(d) not in token_labels]
        if not new:
            break
        for d in new:
            try:
                chars = python_char_labels(docs[d].text)
                starts = token_char_starts(tok, encoded[d], docs[d].text, pieces)
            except (UntokenizableSource, UnalignedTokens) as e:
                counts["untokenizable" if isinstance(e, UntokenizableSource) else "unaligned"] += 1
                tokens[d] = tokens[d][:0]
                token_labels[d] = {}
                continue
            token_labels[d] = {a: chars[a][starts] for a in ATTRIBUTES}
    counts["used"] = len(np.unique(windows.doc_ids))

    # Windows depend on document lengths only, so the same call on positions tells where
    # each captured row sits in its document.
    where = make_windows([np.arange(len(t)) for t in tokens], length, max_tokens, seed=seed)
    rows_doc = np.repeat(windows.doc_ids, windows.valid.sum(1))
    rows_pos = where.input_ids[where.valid]
    row_tokens = windows.input_ids[windows.valid]
    labels = {a: np.empty(len(row_tokens), np.int8) for a in ATTRIBUTES}
    for d in np.unique(rows_doc):
        mine = rows_doc == d
        if not np.array_equal(tokens[d][rows_pos[mine]], row_tokens[mine]):
            raise RuntimeError("token windows are not a function of document lengths alone")
        for a in ATTRIBUTES:
            labels[a][mine] = token_labels[int(d)][a][rows_pos[mine]]
    cap = capture(
        adapter,
        windows,
        list(sites),
        batch_size=batch_size,
        dtype=dtype,
        directory=directory,
        progress=progress,
        desc="capture attributes",
    )
    return AttributeData(
        acts=cap.acts,
        labels=labels,
        token_ids=row_tokens,
        doc_ids=rows_doc,
        counts=counts,
    )


class SoftmaxProbe:
    """Multinomial logistic regression on standardised activations.

    Minimises ``mean cross-entropy(Z W + b, y) + |W|² / (2 C n)`` with ``Z`` the activations
    standardised by the training rows' mean and standard deviation (so ``C`` means the same at
    every layer whatever its scale): scikit-learn's ``LogisticRegression(C=C)`` objective
    (lbfgs, multinomial, intercept unpenalised) on ``Z``, solved in torch with full-batch
    L-BFGS, which is much faster on CPU and runs on ``device``. ``tol`` bounds the largest
    gradient entry at the solution; accuracies settle well before 1e-4.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 300, tol: float = 1e-4, device: str = "cpu"):
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.device = device

    def _tensor(self, X: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(X, torch.Tensor):
            return X.to(self.device, torch.float32)
        return to_tensor(X, device=self.device)

    def fit(self, X: np.ndarray | torch.Tensor, y: np.ndarray) -> SoftmaxProbe:
        if self.C <= 0:
            raise NnobsError(f"C must be positive, got {self.C}")
        X = self._tensor(X)
        n, d = X.shape
        if len(y) != n:
            raise NnobsError(f"labels have {len(y)} rows but the activations have {n}")
        self.classes_, codes = np.unique(np.asarray(y), return_inverse=True)
        self.mean_ = X.mean(0)
        std = X.std(0)
        self.scale_ = torch.where(std > 0, std, torch.ones_like(std))
        k = len(self.classes_)
        prior = np.bincount(codes, minlength=k) / n
        weight = torch.zeros(d, k, device=X.device, requires_grad=True)
        bias = torch.tensor(np.log(prior), dtype=torch.float32, device=X.device)
        self.converged_ = True
        if k > 1:  # with one class there is nothing to fit: it is always the answer
            bias.requires_grad_(True)
            Z = (X - self.mean_) / self.scale_
            target = torch.as_tensor(codes, device=X.device)
            penalty = 1.0 / (2.0 * self.C * n)
            opt = torch.optim.LBFGS(
                [weight, bias],
                max_iter=self.max_iter,
                tolerance_grad=self.tol,
                tolerance_change=1e-10,
                history_size=10,
                line_search_fn="strong_wolfe",
            )

            def closure() -> torch.Tensor:
                opt.zero_grad()
                logits = Z @ weight + bias
                loss = F.cross_entropy(logits, target) + penalty * (weight * weight).sum()
                loss.backward()
                return loss

            opt.step(closure)
            self.converged_ = int(opt.state[weight]["n_iter"]) < self.max_iter
        self.weight_, self.bias_ = weight.detach(), bias.detach()
        return self

    def predict(self, X: np.ndarray | torch.Tensor) -> np.ndarray:
        if not hasattr(self, "classes_"):
            raise NnobsError("SoftmaxProbe is not fitted; call fit() first")
        X = self._tensor(X)
        logits = ((X - self.mean_) / self.scale_) @ self.weight_ + self.bias_
        return self.classes_[logits.argmax(1).cpu().numpy()]

    def score(self, X: np.ndarray | torch.Tensor, y: np.ndarray) -> float:
        """Accuracy on ``(X, y)``."""
        return float(np.mean(self.predict(X) == np.asarray(y)))


def control_labels(
    token_ids_train: np.ndarray,
    token_ids_test: np.ndarray,
    y_train: np.ndarray,
    seed: int | Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """The control task: each token id gets one label drawn from ``y_train``'s distribution.

    Ids seen only in the test tokens get labels too, from the same draw, so the control probe
    is scored on the same rows as the real one.
    """
    values, counts = np.unique(y_train, return_counts=True)
    types = np.unique(np.concatenate([token_ids_train, token_ids_test]))
    drawn = np.random.default_rng(seed).choice(values, size=len(types), p=counts / counts.sum())
    return drawn[np.searchsorted(types, token_ids_train)], drawn[
        np.searchsorted(types, token_ids_test)
    ]


def _check_data(name: str, data: AttributeData, attributes: Sequence[str], sites: list[str]):
    n = len(data.token_ids)
    if n == 0:
        raise NnobsError(f"the {name} attribute data has no tokens; capture some first")
    for a in attributes:
        if a not in data.labels:
            raise NnobsError(f"the {name} data has no {a!r} labels (it has {sorted(data.labels)})")
        if len(data.labels[a]) != n:
            raise NnobsError(f"{name} labels {a!r} have {len(data.labels[a])} rows, not {n}")
    for site in sites:
        if site not in data.acts:
            raise NnobsError(f"the {name} data has no activations for site {site!r}")
        if data.acts[site].shape[0] != n:
            raise NnobsError(f"{name} activations of {site} have the wrong number of rows")


def probe_attributes(
    train: AttributeData,
    test: AttributeData,
    *,
    attributes: Sequence[str] = ATTRIBUTES,
    sites: Sequence[str] | None = None,
    seed: int = 0,
    C: float = 1.0,
    max_iter: int = 300,
    device: str = "cpu",
) -> dict[str, Any]:
    """Linear probes per attribute and site, with a majority baseline, the control task and
    shuffled labels (see the module docstring for what selectivity means).

    ``train`` and ``test`` should come from disjoint documents. Each probe is a
    :class:`SoftmaxProbe` with inverse L2 strength ``C``, run on ``device``. Returns plain
    data::

        {"attributes": {attr: {"classes": [...], "sites": {site: {
            "accuracy", "majority_baseline", "control_accuracy",
            "control_majority_baseline", "selectivity", "shuffled_accuracy",
            "converged"}}}}, "n_train", "n_test", "settings"}

    Baselines predict the most frequent training class. When the test documents' label mix
    differs from the training documents' (few documents), the two majority baselines differ
    too; compare each accuracy with its own baseline before reading selectivity.

    A site whose training tokens hold a single class of an attribute is reported as
    ``{"skipped": reason}``.
    """
    unknown = [a for a in attributes if a not in CLASSES]
    if unknown:
        raise NnobsError(f"unknown attribute(s) {unknown}: choose from {', '.join(ATTRIBUTES)}")
    sites = list(train.acts if sites is None else sites)
    _check_data("train", train, attributes, sites)
    _check_data("test", test, attributes, sites)

    prepared = {}  # per attribute: real, control and shuffled training labels
    for index, a in enumerate(attributes):
        y_train, y_test = np.asarray(train.labels[a]), np.asarray(test.labels[a])
        rng_seed = [seed, index]
        ctrl_train, ctrl_test = control_labels(train.token_ids, test.token_ids, y_train, rng_seed)
        shuffled = np.random.default_rng([*rng_seed, 1]).permutation(y_train)
        prepared[a] = (y_train, y_test, ctrl_train, ctrl_test, shuffled)

    results: dict[str, Any] = {a: {"classes": list(CLASSES[a]), "sites": {}} for a in attributes}
    for site in sites:
        X_train = to_tensor(train.acts[site], device=device)
        X_test = to_tensor(test.acts[site], device=device)
        for a in attributes:
            y_train, y_test, ctrl_train, ctrl_test, shuffled = prepared[a]
            values, counts = np.unique(y_train, return_counts=True)
            if len(values) < 2:
                results[a]["sites"][site] = {
                    "skipped": f"every training token has class {CLASSES[a][values[0]]!r}"
                }
                continue
            real = SoftmaxProbe(C, max_iter, device=device).fit(X_train, y_train)
            control = SoftmaxProbe(C, max_iter, device=device).fit(X_train, ctrl_train)
            null = SoftmaxProbe(C, max_iter, device=device).fit(X_train, shuffled)
            accuracy = real.score(X_test, y_test)
            control_accuracy = control.score(X_test, ctrl_test)
            results[a]["sites"][site] = {
                "accuracy": accuracy,
                "majority_baseline": float(np.mean(y_test == values[np.argmax(counts)])),
                "control_accuracy": control_accuracy,
                "control_majority_baseline": float(
                    np.mean(ctrl_test == np.bincount(ctrl_train).argmax())
                ),
                "selectivity": accuracy - control_accuracy,
                "shuffled_accuracy": null.score(X_test, y_test),
                "converged": real.converged_ and control.converged_ and null.converged_,
            }
    return {
        "attributes": results,
        "n_train": len(train.token_ids),
        "n_test": len(test.token_ids),
        "settings": {"seed": seed, "C": C, "max_iter": max_iter, "probe": "softmax-lbfgs"},
    }
