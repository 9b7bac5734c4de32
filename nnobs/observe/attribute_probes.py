"""Attribute probes: what a layer linearly encodes about Python source, with exact labels.

Labels come from :mod:`nnobs.data.python_labels` (exact, from ``tokenize``); files that
cannot be labelled exactly are skipped and counted.

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

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from nnobs.core.errors import NnobsError
from nnobs.data.corpus import Document
from nnobs.data.encoding import encode_documents
from nnobs.data.python_labels import (
    ATTRIBUTES,
    CLASSES,
    UnalignedTokens,
    UntokenizableSource,
    python_char_labels,
    token_char_starts,
)
from nnobs.data.tokenizer import Tokenizer
from nnobs.data.windows import Windows, make_windows, window_length
from nnobs.measure.arrays import to_tensor
from nnobs.models.adapter import ModelAdapter
from nnobs.observe.capture import capture
from nnobs.observe.settings import ObserveSettings


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
    dtype: npt.DTypeLike = np.float32,
    directory: str | os.PathLike | None = None,
    progress: bool = False,
    cache_dir: Path | None = None,
    doc_tokens: int | None = None,
) -> AttributeData:
    """Capture ``sites`` on windows of ``docs`` and label each captured token exactly.

    Documents that do not tokenize as Python, or whose model tokens cannot be aligned to
    characters, are skipped and counted in ``counts``. Windows are those of
    :func:`nnobs.data.windows.make_windows` (``seed`` picks the document order, ``max_tokens``
    caps the rows); ``seq_len`` defaults as in the observability protocol; ``cache_dir`` is
    where token arrays are cached (:func:`nnobs.data.encoding.encode_documents`).
    ``doc_tokens`` keeps only the first that many tokens of each document, so that a budget
    spreads over many files: label mixes differ a lot between files (a table of literals is all
    brackets and strings), and a few long files make a training and a test set that disagree.
    """
    tok = adapter.tokenizer
    if tok is None:
        raise NnobsError("the model has no tokenizer; load it from a directory that has one")
    length = window_length(adapter.context_length, seq_len)
    if doc_tokens is not None and doc_tokens < 2:
        raise NnobsError(f"doc_tokens must be at least 2, got {doc_tokens}")
    labeller = _DocumentLabels(docs, tok, encode_documents(list(docs), tok, cache_dir=cache_dir))
    tokens = [t[:doc_tokens].astype(np.int64) for t in labeller.encoded]
    windows = labeller.windows(tokens, length, max_tokens, seed)
    rows_doc, rows_pos = windows.row_documents(), windows.row_positions()
    labels = {a: np.empty(windows.n_tokens, np.int8) for a in ATTRIBUTES}
    for d in np.unique(rows_doc):
        mine = rows_doc == d
        for a in ATTRIBUTES:
            labels[a][mine] = labeller.labels[int(d)][a][rows_pos[mine]]
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
        token_ids=windows.input_ids[windows.valid],
        doc_ids=rows_doc,
        counts=labeller.counts,
    )


class _DocumentLabels:
    """Exact labels of each model token of the documents, made only for the documents that
    windows use (``tokenize`` is slow on a whole corpus); documents that cannot be labelled
    are counted."""

    def __init__(
        self, docs: Sequence[Document], tokenizer: Tokenizer, encoded: list[np.ndarray]
    ) -> None:
        self.docs, self.tokenizer, self.encoded = docs, tokenizer, encoded
        self.counts = {"documents": len(docs), "untokenizable": 0, "unaligned": 0}
        self.labels: dict[int, dict[str, np.ndarray]] = {}  # document -> attribute -> per token
        self._pieces: dict[int, str] = {}

    def windows(
        self, tokens: list[np.ndarray], length: int, max_tokens: int | None, seed: int
    ) -> Windows:
        """Windows of ``tokens`` whose documents are all labelled.

        A document that cannot be labelled is emptied in ``tokens`` rather than removed, which
        keeps the seeded document order, and the windows are cut again until all their
        documents are labelled.
        """
        while True:
            try:
                windows = make_windows(tokens, length, max_tokens, seed=seed, split="attributes")
            except NnobsError as e:
                if not self.counts["untokenizable"] + self.counts["unaligned"]:
                    raise
                raise NnobsError(
                    f"{e} ({self.counts['untokenizable']} documents not tokenizable as Python "
                    f"and {self.counts['unaligned']} not alignable to the tokenizer were skipped)"
                ) from None
            new = [int(d) for d in np.unique(windows.doc_ids) if int(d) not in self.labels]
            if not new:
                self.counts["used"] = len(np.unique(windows.doc_ids))
                return windows
            for d in new:
                if not self._label(d):
                    tokens[d] = tokens[d][:0]

    def _label(self, d: int) -> bool:
        """Label document ``d``'s tokens; False (and counted) when it cannot be labelled."""
        text = self.docs[d].text
        try:
            chars = python_char_labels(text)
            starts = token_char_starts(self.tokenizer, self.encoded[d], text, self._pieces)
        except (UntokenizableSource, UnalignedTokens) as e:
            self.counts["untokenizable" if isinstance(e, UntokenizableSource) else "unaligned"] += 1
            self.labels[d] = {}
            return False
        self.labels[d] = {a: chars[a][starts] for a in ATTRIBUTES}
        return True


def attribute_profile(
    adapter: ModelAdapter,
    docs: dict[str, list[Document]],
    sites: list[str],
    settings: ObserveSettings,
) -> dict[str, dict[str, list]]:
    """Attribute probes per site (probe-train documents → test documents) at the protocol's
    budget and windows, compacted to one list per statistic with one value per site."""
    data = {
        split: attribute_dataset(
            adapter,
            docs[split],
            sites,
            settings.token_budget(adapter.d_model),
            settings.seq_len,
            seed=settings.window_seed,
            batch_size=settings.batch_size,
        )
        for split in ("train", "test")
    }
    result = probe_attributes(data["train"], data["test"])
    keys = ("accuracy", "control_accuracy", "selectivity", "majority_baseline")
    return {
        name: {key: [attr["sites"][site].get(key) for site in sites] for key in keys}
        for name, attr in result["attributes"].items()
    }


class SoftmaxProbe:
    """Multinomial logistic regression on standardised activations.

    Minimises ``mean cross-entropy(Z W + b, y) + |W|² / (2 C n)`` with ``Z`` the activations
    standardised by the training rows' mean and standard deviation (so ``C`` means the same at
    every layer whatever its scale): scikit-learn's ``LogisticRegression(C=C)`` objective
    (lbfgs, multinomial, intercept unpenalised) on ``Z``, solved in torch with full-batch
    L-BFGS, which is much faster on CPU and runs on ``device``. ``tol`` bounds the largest
    gradient entry at the solution; accuracies settle well before 1e-4.
    """

    def __init__(
        self, C: float = 1.0, max_iter: int = 300, tol: float = 1e-4, device: str = "cpu"
    ) -> None:
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


def _check_data(
    name: str, data: AttributeData, attributes: Sequence[str], sites: list[str]
) -> None:
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
