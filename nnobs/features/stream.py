"""A site's activations, one batch of token windows at a time: what every feature computation
streams over, so memory stays bounded by a batch whatever the token budget."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from nnobs.core.errors import NnobsError
from nnobs.data.windows import Windows
from nnobs.interventions.targets import site_shape
from nnobs.models.adapter import ModelAdapter
from nnobs.models.sites import SITE_KINDS, site_kind

# Sites whose vectors are added into (or are) the residual stream: a direction there has a
# direct effect on the logits through the final norm and the unembedding.
STREAM_KINDS = ("embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


@dataclass
class SiteBatch:
    """One forward pass's activations at a site, with the tokens they were read at."""

    acts: torch.Tensor  # (B, T, d) float32
    input_ids: torch.Tensor  # (B, T)
    valid: torch.Tensor  # (B, T) bool: scored positions
    first_row: int  # index of this batch's first window in the Windows


def site_width(adapter: ModelAdapter, site: str) -> int:
    """The width of a per-token site's activation vectors; other sites are refused."""
    kind = SITE_KINDS.get(site_kind(site))
    shape = site_shape(adapter, site)
    if kind is None or not kind.per_token or len(shape) != 3:
        raise NnobsError(
            f"{site} is not a (batch × pos × width) site: features are read from embed, final "
            "or blocks.<l>.{resid_pre,resid_mid,resid_post,attn_out,mlp_out,mlp_hidden}"
        )
    return int(shape[-1])


def site_batches(
    adapter: ModelAdapter, windows: Windows, site: str, batch_size: int = 16
) -> Iterator[SiteBatch]:
    """The site's activations for ``batch_size`` windows at a time (float32, on the model's
    device), without gradients."""
    if batch_size < 1:
        raise NnobsError(f"batch_size must be a positive integer, got {batch_size}")
    device = adapter.device
    for first in range(0, len(windows.input_ids), batch_size):
        rows = slice(first, first + batch_size)
        ids = torch.from_numpy(windows.input_ids[rows]).to(device)
        valid = torch.from_numpy(windows.valid[rows]).to(device)
        with torch.inference_mode():
            _, cache = adapter.run_with_cache(ids, [site], attention_mask=valid.long())
        yield SiteBatch(cache[site].float(), ids, valid, first)


def budget_windows(
    adapter: ModelAdapter,
    corpus: str,
    split: str,
    tokens: int,
    window_len: int,
    seed: int = 0,
) -> Windows:
    """About ``tokens`` scored tokens of a corpus split in windows of ``window_len`` (at most
    the model's context), spread over its documents by the protocol's windowing policy."""
    from nnobs.interventions.direction import direction_windows

    if tokens < 1:
        raise NnobsError(f"token budgets must be positive, got {tokens}")
    length = min(window_len, adapter.context_length or window_len)
    n_windows = max(1, -(-tokens // length))
    return direction_windows(adapter.tokenizer, corpus, split, n_windows, length, seed)
