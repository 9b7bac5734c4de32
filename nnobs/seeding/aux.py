"""The auxiliary task: a linear head on the residual stream after a chosen layer, trained
to predict an exact Python attribute of each input token (:mod:`nnobs.data.python_labels`)
beside the next-token loss, with its loss weight as a knob.

The labels follow the training token stream (:func:`attribute_stream`), so the head sees the
label of every token the trainer draws, whatever window it lands in. It plugs into training
as an :class:`~nnobs.training.trainer.ExtraObjective`: its weights are trained by the run's
optimizer and saved with every checkpoint, and a run resumes only with the same settings.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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
from nnobs.training.trainer import ExtraObjective

IGNORED = -1  # the label of a token without one: end-of-document, or a file tokenize rejects


def attribute_stream(docs: Sequence[Document], tokenizer: Tokenizer, attribute: str) -> np.ndarray:
    """``attribute``'s label code for each token of the documents' training stream
    (:func:`nnobs.data.encoding.token_stream`: documents joined by end-of-document), row for
    row; :data:`IGNORED` where there is none."""
    if attribute not in ATTRIBUTES:
        raise NnobsError(f"unknown attribute {attribute!r}: choose from {', '.join(ATTRIBUTES)}")
    encoded = encode_documents(list(docs), tokenizer)
    pieces: dict[int, str] = {}
    parts: list[np.ndarray] = []
    for index, (doc, ids) in enumerate(zip(docs, encoded, strict=True)):
        if index:
            parts.append(np.array([IGNORED], np.int64))
        try:
            chars = python_char_labels(doc.text)[attribute]
            parts.append(
                chars[token_char_starts(tokenizer, ids, doc.text, pieces)].astype(np.int64)
            )
        except (UntokenizableSource, UnalignedTokens):
            parts.append(np.full(len(ids), IGNORED, np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def labels_fingerprint(labels: np.ndarray) -> str:
    """A short hash of a label stream: part of the head's settings, so a run resumes only on
    the same labels."""
    return hashlib.sha256(np.ascontiguousarray(labels, np.int64).tobytes()).hexdigest()[:12]


class AttributeHead(ExtraObjective):
    """Next-token loss plus ``weight`` × the cross-entropy of a linear head that reads the
    residual stream after block ``layer`` and predicts each input token's ``attribute``.

    ``labels`` is :func:`attribute_stream` of the run's training split. The head starts at
    zero (uniform predictions), so it adds no randomness to the run.
    """

    def __init__(
        self, labels: np.ndarray, attribute: str, layer: int, weight: float, d_model: int
    ) -> None:
        super().__init__()
        if attribute not in CLASSES:
            raise NnobsError(
                f"unknown attribute {attribute!r}: choose from {', '.join(ATTRIBUTES)}"
            )
        if not weight > 0:
            raise NnobsError(f"the auxiliary loss weight must be positive, got {weight}")
        self.attribute, self.layer, self.weight = attribute, layer, float(weight)
        self.head = nn.Linear(d_model, len(CLASSES[attribute]))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.labels = torch.as_tensor(np.asarray(labels, np.int64))
        self.fingerprint = labels_fingerprint(labels)

    @property
    def site(self) -> str:
        return f"blocks.{self.layer}.resid_post"

    def settings(self) -> dict[str, Any]:
        return {
            "kind": "attribute_head",
            "attribute": self.attribute,
            "site": self.site,
            "weight": self.weight,
            "labels": self.fingerprint,
        }

    def forward(
        self, model: nn.Module, idx: torch.Tensor, targets: torch.Tensor, starts: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sites = model.hook_points()
        if self.site not in sites:
            raise NnobsError(f"the model has no site {self.site!r} for the auxiliary head")
        seen: list[torch.Tensor] = []
        handle = sites[self.site].register_forward_hook(lambda m, i, out: seen.append(out))
        try:
            loss, parts = model.training_loss(idx, targets)
        finally:
            handle.remove()
        if self.labels.device != idx.device:
            self.labels = self.labels.to(idx.device)
        labels = self.labels[starts[:, None] + torch.arange(idx.shape[1], device=idx.device)]
        logits = self.head(seen[0]).float()
        total = F.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORED, reduction="sum"
        )
        attr_loss = total / (labels != IGNORED).sum().clamp(min=1)
        return loss + self.weight * attr_loss, {**parts, "attr_loss": attr_loss}


def aux_objective(
    docs: Sequence[Document],
    tokenizer: Tokenizer,
    attribute: str,
    layer: int,
    weight: float,
    d_model: int,
    n_layers: int,
) -> AttributeHead:
    """The auxiliary head for a run on ``docs`` (its training split), checked against the
    model's depth."""
    if not 0 <= layer < n_layers:
        raise NnobsError(
            f"aux layer {layer} is out of range: the model has layers 0..{n_layers - 1}"
        )
    return AttributeHead(
        attribute_stream(docs, tokenizer, attribute), attribute, layer, weight, d_model
    )
