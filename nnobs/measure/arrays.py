"""Activation arrays as the estimators read them: checked shapes, row blocks, float32 tensors.

Activations arrive as ``(n, d)`` arrays, float16/float32/float64, in memory or memory-mapped;
they are converted to float32 torch tensors in row blocks, so a float16 memmap never becomes a
float64 copy.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from nnobs.core.errors import NnobsError
from nnobs.measure.stats import check_finite

# Row blocks hold about this many elements (64 MiB as float32), whatever the width.
CHUNK_ELEMENTS = 1 << 24


def chunk_rows(d: int) -> int:
    """Rows per block for width ``d``."""
    return max(1, CHUNK_ELEMENTS // d)


def fits_one_block(elements: int) -> bool:
    """Whether an array of ``elements`` values is read as a single row block."""
    return elements <= CHUNK_ELEMENTS


def activation_shape(X: np.ndarray) -> tuple[int, int]:
    """``(n, d)`` of a non-empty 2-D activation array, else an ``NnobsError`` that says why."""
    if len(getattr(X, "shape", ())) != 2:
        raise NnobsError(
            f"activations must be a 2-D (tokens, features) array, got shape {np.shape(X)}"
        )
    n, d = X.shape
    if n == 0 or d == 0:
        raise NnobsError(f"activations are empty (shape {X.shape}); capture some tokens first")
    return n, d


def check_width(X: np.ndarray, d: int) -> None:
    """Raise ``NnobsError`` unless ``X`` has the ``d`` features an estimator was fit on."""
    if activation_shape(X)[1] != d:
        raise NnobsError(f"activations have {X.shape[1]} features but the probe was fit on {d}")


def row_blocks(
    X: np.ndarray, rows: np.ndarray | None = None
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, stop, block)``: float32 CPU tensors of row blocks of ``X`` (or of
    ``X[rows]``), checked finite. ``start:stop`` indexes the output, not ``X``.

    Torch converts the dtype: for float16 it is several times faster than numpy's ``astype``.
    """
    total = X.shape[0] if rows is None else len(rows)
    step = chunk_rows(X.shape[1])
    for a in range(0, total, step):
        b = min(a + step, total)
        block = np.asarray(X[a:b] if rows is None else X[rows[a:b]])
        if not (block.flags.writeable and block.flags.c_contiguous):
            block = np.array(block)  # a read-only memmap view: torch wants its own memory
        tensor = torch.from_numpy(block).float()
        # A NaN or inf anywhere makes the sum non-finite, and a sum is far cheaper than an
        # elementwise test; only a (rare) overflowing sum needs the exact check.
        if not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
            first, last = (a, b - 1) if rows is None else (rows[a], rows[b - 1])
            check_finite(f"activations (rows {first}..{last})", block)
            raise NnobsError(
                f"activations (rows {first}..{last}) exceed the float32 range; rescale them"
            )
        yield a, b, tensor


def check_rows_finite(X: np.ndarray) -> None:
    """Raise ``NnobsError`` if any row of ``X`` holds NaN or inf (reads ``X`` once, in blocks)."""
    for _ in row_blocks(X):
        pass


def to_tensor(
    X: np.ndarray, rows: np.ndarray | None = None, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """``X`` (or ``X[rows]``, rows sorted) as one float32 ``(n, d)`` tensor on ``device``.

    A writable float32 C-contiguous array on the CPU is shared, not copied.
    """
    _, d = activation_shape(X)
    device = torch.device(device)
    shareable = (
        rows is None
        and device.type == "cpu"
        and type(X) is np.ndarray
        and X.dtype == np.float32
        and X.flags.c_contiguous
        and X.flags.writeable
    )
    if shareable:
        check_rows_finite(X)
        return torch.from_numpy(X)
    out = torch.empty((X.shape[0] if rows is None else len(rows), d), device=device)
    for a, b, block in row_blocks(X, rows):
        out[a:b] = block.to(device)
    return out


def weighted_moments(Xt: torch.Tensor, wt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of the rows of ``Xt`` under weights ``wt`` (summing to 1), float64.

    Two passes (mean, then centred products) so a large mean does not swamp the covariance.
    """
    step = chunk_rows(Xt.shape[1])
    mean = torch.zeros(Xt.shape[1], dtype=torch.float64, device=Xt.device)
    for a in range(0, len(Xt), step):
        mean += (wt[a : a + step].float() @ Xt[a : a + step]).double()
    mean32, root_w = mean.float(), wt.sqrt().float()
    cov = torch.zeros(Xt.shape[1], Xt.shape[1], dtype=torch.float64, device=Xt.device)
    for a in range(0, len(Xt), step):
        scaled = (Xt[a : a + step] - mean32).mul_(root_w[a : a + step, None])
        cov += (scaled.T @ scaled).double()
    return mean, cov
