"""How well trained bridges join the two models, per site, on held-out documents.

For every site: the NMSE of the encoder (dense → sparse) and of the decoder (sparse → dense),
each the mean squared error over the held-out tokens divided by the target stream's variance
over them; and for each hybrid pass (the sparse model continued from the encoded dense stream,
the dense model continued from the decoded sparse stream) its next-token loss and its KL from
the dense model alone and from the sparse model alone, and its loss minus the dense model's
own on the same tokens (paired: its interval is far narrower than the loss's). Each model's
own loss is the baseline.
Every interval is a 95% percentile bootstrap over documents (statistics are ratios of sums over
the resampled documents, so a long document weighs by its tokens, as in the point estimate).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from nnobs.circuits.bridge_loss import HYBRIDS, bridge_terms
from nnobs.circuits.bridge_model import Bridges
from nnobs.core.results import software_provenance
from nnobs.data.windows import Windows
from nnobs.measure.stats import percentile_interval
from nnobs.models.adapter import ModelAdapter

SCHEMA = "nnobs.bridge"
SCHEMA_VERSION = 1
# Per-site terms summed per document (see nnobs.circuits.bridge_loss).
SITE_TERMS = ("enc_err", "dec_err") + tuple(
    f"{kind}_{h}" for h in HYBRIDS for kind in ("ce", "kl_dense", "kl_sparse")
)


class _Sums:
    """Per-document sums of per-token terms, token counts, and each site's stream moments."""

    def __init__(self, doc_ids: np.ndarray, n_sites: int) -> None:
        self.docs, self.index = np.unique(doc_ids, return_inverse=True)
        n = len(self.docs)
        self.terms = {name: np.zeros((n, n_sites)) for name in SITE_TERMS}
        self.own = {"dense": np.zeros(n), "sparse": np.zeros(n)}
        self.counts = np.zeros(n)
        self.moments: dict[str, list] = {"dense": [], "sparse": []}

    def add(self, rows: np.ndarray, out, valid: torch.Tensor) -> None:
        mask = valid.to(torch.float64)
        where = self.index[rows]
        np.add.at(self.counts, where, mask.sum(1).numpy())
        for name in SITE_TERMS:
            per_row = (out.terms[name].detach().cpu().double() * mask).sum(-1).numpy().T
            np.add.at(self.terms[name], where, per_row)
        for role, ce in (("dense", out.ce_dense), ("sparse", out.ce_sparse)):
            np.add.at(self.own[role], where, (ce.cpu().double() * mask).sum(1).numpy())
        for role, acts in (("dense", out.dense_acts), ("sparse", out.sparse_acts)):
            flat = {s: a.cpu().double()[valid] for s, a in acts.items()}
            self.moments[role].append(
                {s: (len(f), f.sum(0), f.pow(2).sum()) for s, f in flat.items()}
            )

    def variance(self, role: str, site: str) -> float:
        """Mean squared distance of the site's stream from its mean over every valid token."""
        n = sum(m[site][0] for m in self.moments[role])
        total = sum(m[site][1] for m in self.moments[role])
        squares = sum(m[site][2] for m in self.moments[role])
        return float(squares / n - (total / n).pow(2).sum())


def _ratio(sums: np.ndarray, counts: np.ndarray, draws: np.ndarray, scale: float = 1.0):
    """The point ratio Σ sums / Σ counts / scale and its 95% bootstrap interval."""
    point = sums.sum() / counts.sum() / scale
    replicates = sums[draws].sum(1) / counts[draws].sum(1) / scale
    return float(point), list(percentile_interval(replicates))


def evaluate_bridges(
    bridges: Bridges,
    dense: ModelAdapter,
    sparse: ModelAdapter,
    windows: Windows,
    batch_size: int = 8,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Per-site NMSE both ways and the hybrid passes' loss and KL, with intervals over the
    windows' documents; and each model's own loss."""
    sums = _Sums(windows.doc_ids, len(bridges.sites))
    bar = tqdm(
        total=len(windows.input_ids), desc="bridge eval", unit="window", disable=not progress
    )
    with torch.no_grad():
        for start in range(0, len(windows.input_ids), batch_size):
            rows = np.arange(start, min(start + batch_size, len(windows.input_ids)))
            ids = torch.as_tensor(windows.input_ids[rows]).to(dense.device)
            targets = torch.as_tensor(windows.targets[rows]).to(dense.device)
            out = bridge_terms(bridges, dense, sparse, ids, targets)
            sums.add(rows, out, torch.as_tensor(windows.valid[rows]))
            bar.update(len(rows))
    bar.close()
    draws = np.random.default_rng(seed).integers(0, len(sums.docs), (n_boot, len(sums.docs)))
    counts = sums.counts

    def stat(values: np.ndarray, scale: float = 1.0) -> dict:
        value, ci = _ratio(values, counts, draws, scale)
        return {"value": value, "ci95": ci}

    sites = []
    for i, site in enumerate(bridges.sites):
        layer, kind = int(site.split(".")[1]), site.rsplit(".", 1)[-1]
        entry = {
            "site": site,
            "layer": layer,
            "sublayer": "attn" if kind == "resid_pre" else "mlp",
            "nmse_encode": stat(sums.terms["enc_err"][:, i], sums.variance("sparse", site)),
            "nmse_decode": stat(sums.terms["dec_err"][:, i], sums.variance("dense", site)),
        }
        for h in HYBRIDS:
            entry[h] = {
                "loss": stat(sums.terms[f"ce_{h}"][:, i]),
                "loss_gap_dense": stat(sums.terms[f"ce_{h}"][:, i] - sums.own["dense"]),
                "kl_dense": stat(sums.terms[f"kl_dense_{h}"][:, i]),
                "kl_sparse": stat(sums.terms[f"kl_sparse_{h}"][:, i]),
            }
        sites.append(entry)
    return {
        "n_documents": int(len(sums.docs)),
        "n_tokens": int(counts.sum()),
        "n_boot": n_boot,
        "models": {
            "dense": {"loss": stat(sums.own["dense"])},
            "sparse": {
                "loss": stat(sums.own["sparse"]),
                "loss_gap_dense": stat(sums.own["sparse"] - sums.own["dense"]),
            },
        },
        "sites": sites,
    }


def bridge_document(config: dict, evaluation: dict, heldout: dict, curve: list[dict]) -> dict:
    """The ``nnobs.bridge`` result: the bridge directory's config, the training curve, the
    held-out windows and the per-site evaluation."""
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "kind": "bridge",
        "provenance": software_provenance(),
        "dense": config["dense"],
        "sparse": config["sparse"],
        "settings": config["settings"],
        "shape": config["shape"],
        "heldout": heldout,
        "training_curve": curve,
        **evaluation,
    }
