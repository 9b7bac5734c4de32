"""How good a dictionary is on held-out text: variance explained, L0, dead features, and the
model's loss with the SAE's reconstruction spliced in at its site.

Loss recovered = (L_mean − L_spliced) / (L_mean − L_clean), where L_mean replaces the site by
its mean activation: 1 means the reconstruction loses nothing the model uses, 0 means it is
no better than the mean. Positions can be left out of the reconstruction statistics by their
place in the window (``skip_positions``; the first positions of a document often have
outlier norms that dominate a squared error).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from nnobs.data.windows import Windows
from nnobs.features.sae import SparseAutoencoder
from nnobs.features.stream import site_batches
from nnobs.measure import stats
from nnobs.models.adapter import ModelAdapter
from nnobs.observe.capture import capture


def reconstruction_stats(
    adapter: ModelAdapter,
    sae: SparseAutoencoder,
    windows: Windows,
    *,
    batch_size: int = 16,
    skip_positions: int = 0,
) -> dict[str, Any]:
    """Variance explained, L0 and the features that never fired, in one streamed pass; also the
    site's mean activation (what mean ablation puts in its place)."""
    device = adapter.device
    sae = sae.to(device)
    total = torch.zeros(sae.d_in, dtype=torch.float64, device=device)
    square, error, l0, n = 0.0, 0.0, 0.0, 0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=device)
    for batch in site_batches(adapter, windows, sae.site, batch_size):
        keep = batch.valid.clone()
        keep[:, :skip_positions] = False
        x = batch.acts[keep]
        with torch.no_grad():
            f = sae.encode(x)
            recon = sae.decode(f)
        total += x.double().sum(0)
        square += float((x.double() ** 2).sum())
        error += float(((recon - x).double() ** 2).sum())
        l0 += float((f > 0).sum())
        fired |= (f > 0).any(0)
        n += len(x)
    mean = total / max(n, 1)
    variance = square - n * float((mean**2).sum())
    return {
        "n_tokens": n,
        "variance_explained": 1.0 - error / variance if variance > 0 else None,
        "l0": l0 / max(n, 1),
        "dead_fraction": float((~fired).float().mean()),
        "mean": mean.float(),
    }


def spliced_loss(
    adapter: ModelAdapter,
    sae: SparseAutoencoder,
    windows: Windows,
    mean: torch.Tensor,
    *,
    batch_size: int = 16,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Next-token loss clean, with the reconstruction spliced in, and with the site replaced by
    its mean; the spliced-in increase with a bootstrap interval over documents."""
    sae = sae.to(adapter.device)
    site = sae.site
    mean = mean.to(adapter.device)
    edits = {
        "clean": None,
        "spliced": {site: lambda h: sae(h).to(h.dtype)},
        "mean_ablated": {site: lambda h: mean.to(h.dtype).expand_as(h)},
    }
    losses, docs = {}, None
    for name, edit in edits.items():
        run = capture(adapter, windows, [], batch_size=batch_size, progress=False, edits=edit)
        losses[name], docs = np.asarray(run.loss, dtype=np.float64), np.asarray(run.doc_ids)
    clean, spliced, ablated = (float(losses[k].mean()) for k in edits)
    delta = losses["spliced"] - losses["clean"]
    lo, hi = stats.bootstrap_ci(np.mean, delta, n_boot=n_boot, seed=seed, groups=docs)
    gap = ablated - clean
    return {
        "clean": clean,
        "spliced": spliced,
        "mean_ablated": ablated,
        "delta": float(delta.mean()),
        "delta_ci95": [lo, hi],
        "recovered": (ablated - spliced) / gap if gap > 0 else None,
        "n_tokens": int(len(delta)),
        "n_documents": int(len(np.unique(docs))),
    }


def evaluate_sae(
    adapter: ModelAdapter,
    sae: SparseAutoencoder,
    windows: Windows,
    *,
    batch_size: int = 16,
    skip_positions: int = 0,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """:func:`reconstruction_stats` and :func:`spliced_loss` on the same windows."""
    recon = reconstruction_stats(
        adapter, sae, windows, batch_size=batch_size, skip_positions=skip_positions
    )
    mean = recon.pop("mean")
    loss = spliced_loss(
        adapter, sae, windows, mean, batch_size=batch_size, n_boot=n_boot, seed=seed
    )
    return {**recon, "skip_positions": skip_positions, "loss": loss}
