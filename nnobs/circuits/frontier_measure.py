"""What the frontier measures on each trained model besides its circuits: the pretraining loss
per held-out document (for intervals over documents) and the model's L0 (nonzero weights).

Every model is scored on the same windows: :func:`~nnobs.data.windows.document_windows` of
the corpus's validation split (documents the models never trained on), a budget of tokens
spread over every document, with one seed, and the same tokenizer for every grid point. The
result is kept in ``loss.json`` next to the circuit sizes, keyed by checkpoint and settings,
so a resumed frontier does not score a model twice.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nnobs.core.errors import NnobsError
from nnobs.core.files import read_json, write_json
from nnobs.core.rundir import read_meta, resolve_checkpoint

LOSS_FORMAT = "nnobs-frontier-loss/1"
SPLIT = "validation"
BATCH = 32


def nonzero_weights(model: torch.nn.Module) -> int:
    """L0: the number of nonzero entries over every parameter of ``model``."""
    return int(sum(int(torch.count_nonzero(p)) for p in model.parameters()))


def _score(adapter, windows) -> tuple[np.ndarray, np.ndarray]:
    """Summed next-token loss and scored tokens per window."""
    sums, counts = [], []
    with torch.no_grad():
        for start in range(0, len(windows.input_ids), BATCH):
            rows = slice(start, start + BATCH)
            ids = torch.as_tensor(windows.input_ids[rows], device=adapter.device)
            targets = torch.as_tensor(windows.targets[rows], device=adapter.device)
            valid = torch.as_tensor(windows.valid[rows], device=adapter.device)
            logits = adapter.forward(ids).float()
            loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            sums.append((loss * valid).sum(1).double().cpu().numpy())
            counts.append(valid.sum(1).cpu().numpy())
    return np.concatenate(sums), np.concatenate(counts)


def document_losses(
    run: Path, out: Path, *, corpus: str, max_chars: int | None, seq_len: int, tokens: int,
    device: str = "cpu",
) -> dict[str, Any]:  # fmt: skip
    """The last checkpoint of ``run`` scored per validation document (cached in
    ``out/loss.json``): ``doc_ids``, ``sums`` (nats), ``tokens``, ``loss`` (their ratio), ``l0``,
    ``n_params``, ``step`` and ``seconds``."""
    from nnobs.data.corpus import load_corpus
    from nnobs.data.windows import document_windows
    from nnobs.models.load import load_model

    ckpt = resolve_checkpoint(run, None)
    settings = {
        "checkpoint": str(ckpt.resolve()),
        "step": int(read_meta(ckpt)["step"]),
        "corpus": corpus,
        "max_chars": max_chars,
        "split": SPLIT,
        "seq_len": seq_len,
        "tokens": tokens,
    }
    path = out / "loss.json"
    if path.is_file():
        stored = read_json(path, "frontier loss record")
        if stored.get("format") == LOSS_FORMAT and stored.get("settings") == settings:
            return stored
    start = time.perf_counter()
    adapter = load_model(run, device=device)
    docs = load_corpus(corpus, max_chars=max_chars).split(SPLIT)
    windows = document_windows(docs, adapter.tokenizer, seq_len, tokens, seed=0, split=SPLIT)
    sums, counts = _score(adapter, windows)
    doc_ids = np.unique(windows.doc_ids)
    index = np.searchsorted(doc_ids, windows.doc_ids)
    doc_sums = np.bincount(index, weights=sums, minlength=len(doc_ids))
    doc_tokens = np.bincount(index, weights=counts, minlength=len(doc_ids))
    if doc_tokens.sum() == 0:
        raise NnobsError(f"no validation tokens to score in corpus {corpus!r}")
    record = {
        "format": LOSS_FORMAT,
        "settings": settings,
        "doc_ids": doc_ids.tolist(),
        "sums": doc_sums.tolist(),
        "tokens": doc_tokens.astype(int).tolist(),
        "loss": float(doc_sums.sum() / doc_tokens.sum()),
        "l0": nonzero_weights(adapter.model),
        "n_params": int(sum(p.numel() for p in adapter.model.parameters())),
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_json(path, record)
    return record
