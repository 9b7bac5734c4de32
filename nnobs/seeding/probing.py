"""How well each layer of each checkpoint encodes the auxiliary attribute, on held-out text.

Probes are fit on tokens of one half of the corpus's test documents and scored on the other
half (neither is trained on): ridge R² (``alpha`` on standardised activations, the published
study's probe) for a numeric attribute (bracket depth, indentation level), accuracy of a
softmax probe for a categorical one. The main-task loss is the run's own validation loss at
the checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from nnobs.core.errors import NnobsError
from nnobs.core.rundir import list_checkpoints, read_meta
from nnobs.data.corpus import Document
from nnobs.models.load import load_model
from nnobs.observe.attribute_probes import AttributeData, SoftmaxProbe, attribute_dataset

DOC_TOKENS = 256  # tokens kept per document: the budget spreads over many files


def ridge_r2(
    X_fit: np.ndarray, y_fit: np.ndarray, X_score: np.ndarray, y_score: np.ndarray, alpha: float
) -> float:
    """R² on the scored rows of a ridge regression fit on standardised activations."""
    mean, std = X_fit.mean(0), X_fit.std(0)
    std = np.where(std > 0, std, 1.0)
    Z, Zs = (X_fit - mean) / std, (X_score - mean) / std
    y_mean = y_fit.mean()
    coef = np.linalg.solve(Z.T @ Z + alpha * np.eye(Z.shape[1]), Z.T @ (y_fit - y_mean))
    residual = y_score - (Zs @ coef + y_mean)
    total = ((y_score - y_score.mean()) ** 2).sum()
    return float(1 - (residual**2).sum() / total) if total > 0 else float("nan")


def layer_scores(
    fit: AttributeData, score: AttributeData, attribute: str, metric: str, alpha: float
) -> list[float]:
    """One probe score per site of ``fit.acts`` (in their order)."""
    y_fit = fit.labels[attribute].astype(np.float64)
    y_score = score.labels[attribute].astype(np.float64)
    for part, y in (("fit", y_fit), ("scored", y_score)):
        if np.ptp(y) == 0:
            raise NnobsError(
                f"every {part} probe token has the same {attribute} ({int(y[0])}): no score is "
                f"defined; raise seeding.probe_tokens (now {len(y)} tokens) or use a corpus "
                "with more test files"
            )
    out = []
    for site in fit.acts:
        X_fit = fit.acts[site].astype(np.float64)
        X_score = score.acts[site].astype(np.float64)
        if metric == "r2":
            out.append(ridge_r2(X_fit, y_fit, X_score, y_score, alpha))
        else:
            probe = SoftmaxProbe(C=1.0 / alpha).fit(X_fit, fit.labels[attribute])
            out.append(probe.score(X_score, score.labels[attribute]))
    return out


def probe_run(
    run: str | os.PathLike,
    docs: dict[str, Sequence[Document]],
    attribute: str,
    metric: str,
    *,
    tokens: int,
    seq_len: int,
    alpha: float,
) -> dict[str, Any]:
    """Probe scores at every layer (``resid_post``) of every checkpoint of ``run``, with the
    validation loss: ``{"steps", "scores" (checkpoints × layers), "val_loss"}``. ``docs`` has
    the ``fit`` and ``score`` documents."""
    steps, scores, losses = [], [], []
    for step, path in list_checkpoints(run):
        adapter = load_model(run, step=step)
        sites = [f"blocks.{layer}.resid_post" for layer in range(adapter.n_layers)]
        data = {
            part: attribute_dataset(
                adapter,
                docs[part],
                sites,
                tokens,
                seq_len,
                seed=0,
                dtype=np.float32,
                doc_tokens=DOC_TOKENS,
            )  # fmt: skip
            for part in ("fit", "score")
        }
        steps.append(step)
        scores.append(layer_scores(data["fit"], data["score"], attribute, metric, alpha))
        losses.append(read_meta(path).get("val_loss"))
    return {"steps": steps, "scores": scores, "val_loss": losses}
