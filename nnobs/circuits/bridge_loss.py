"""The bridge objective: per-token terms of every site, from one pass of each model and one
hybrid pass of each.

A *hybrid pass* runs a model from site i onward on the other model's stream carried across the
bridge: the sparse model continued from the encoded dense activation, the dense model continued
from the decoded sparse activation. All sites go in one forward pass per model: the batch is
repeated once per site and copy i has site i replaced (an adapter edit), so copy i is exactly the
model continued from site i. Both models are frozen; only the bridges get gradients.

Terms, per site and token: ``enc_err``/``dec_err`` (squared error of the encoded/decoded
stream, summed over channels; divided by the target's variance they are the NMSE),
``ce_sparse_hybrid``/``ce_dense_hybrid`` (next-token cross-entropy of the hybrid passes),
``kl_dense_sparse_hybrid``/``kl_dense_dense_hybrid`` (KL(dense output ‖ hybrid output), what
the objective trains), and ``kl_sparse_sparse_hybrid``/``kl_sparse_dense_hybrid`` (KL against the
sparse model alone, reported).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nnobs.circuits.bridge_model import Bridges
from nnobs.models.adapter import Edit, ModelAdapter

HYBRIDS = ("sparse_hybrid", "dense_hybrid")


@dataclass
class BridgeTerms:
    """Per-token terms (sites, batch, pos) by name, each model's own cross-entropy
    (batch, pos), and the two models' streams at every site (for the NMSE's variance)."""

    terms: dict[str, torch.Tensor]
    ce_dense: torch.Tensor
    ce_sparse: torch.Tensor
    dense_acts: dict[str, torch.Tensor]
    sparse_acts: dict[str, torch.Tensor]


def _replace_rows(start: int, value: torch.Tensor) -> Edit:
    """Rows ``start:start+len(value)`` of the activation replaced by ``value``."""
    stop = start + len(value)
    return lambda x: torch.cat([x[:start], value.to(x.dtype), x[stop:]])


def hybrid_logits(
    adapter: ModelAdapter, ids: torch.Tensor, replacements: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Logits (sites, batch, pos, vocab): copy i of the batch run with site i's activation
    replaced by ``replacements[site_i]`` (the model continued from that site)."""
    b = ids.shape[0]
    sites = list(replacements)
    edits = {site: _replace_rows(i * b, replacements[site]) for i, site in enumerate(sites)}
    with adapter.hooks(edits=edits):
        logits = adapter.forward(ids.repeat(len(sites), 1))
    return logits.view(len(sites), b, *logits.shape[1:])


def _token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    flat = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), reduction="none")
    return flat.view(targets.shape)


def _token_kl(reference_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ other) per token from log-probabilities over the last axis."""
    return (reference_logp.exp() * (reference_logp - logp)).sum(-1)


def bridge_terms(
    bridges: Bridges,
    dense: ModelAdapter,
    sparse: ModelAdapter,
    ids: torch.Tensor,
    targets: torch.Tensor,
) -> BridgeTerms:
    """Every per-token term of the bridge objective on one batch (differentiable in the
    bridges' weights)."""
    sites = bridges.sites
    with torch.no_grad():
        dense_logits, dense_acts = dense.run_with_cache(ids, sites)
        sparse_logits, sparse_acts = sparse.run_with_cache(ids, sites)
    encoded = {s: bridges.encode(s, dense_acts[s]) for s in sites}
    decoded = {s: bridges.decode(s, sparse_acts[s]) for s in sites}
    logp_dense = F.log_softmax(dense_logits.float(), -1)
    logp_sparse = F.log_softmax(sparse_logits.float(), -1)
    terms = {
        "enc_err": torch.stack([(encoded[s] - sparse_acts[s]).pow(2).sum(-1) for s in sites]),
        "dec_err": torch.stack([(decoded[s] - dense_acts[s]).pow(2).sum(-1) for s in sites]),
    }
    repeated = targets.expand(len(sites), *targets.shape)
    for name, adapter, replacements in (
        ("sparse_hybrid", sparse, encoded),
        ("dense_hybrid", dense, decoded),
    ):
        logits = hybrid_logits(adapter, ids, replacements)
        logp = F.log_softmax(logits.float(), -1)
        terms[f"ce_{name}"] = _token_ce(logits, repeated)
        terms[f"kl_dense_{name}"] = _token_kl(logp_dense, logp)
        terms[f"kl_sparse_{name}"] = _token_kl(logp_sparse, logp).detach()
    return BridgeTerms(
        terms,
        _token_ce(dense_logits, targets),
        _token_ce(sparse_logits, targets),
        dense_acts,
        sparse_acts,
    )


def stream_variance(acts: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the squared distance from the mean stream (the NMSE's scale)."""
    flat = acts.flatten(0, -2).float()
    return (flat - flat.mean(0)).pow(2).sum(-1).mean()


def bridge_objective(
    out: BridgeTerms, lm_coef: float, nmse_coef: float, kl_coef: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss and its parts: ``lm_coef`` × the hybrid passes' mean next-token loss
    (the pretraining loss: with both models frozen their own loss is a constant) +
    ``nmse_coef`` × Σ_sites (NMSE encode + NMSE decode) + ``kl_coef`` × Σ_sites (KL(dense ‖
    sparse continued from the encoding) + KL(dense ‖ dense continued from the decoding))."""
    t = out.terms
    sites = list(out.dense_acts)
    var_sparse = torch.stack([stream_variance(out.sparse_acts[s]) for s in sites])
    var_dense = torch.stack([stream_variance(out.dense_acts[s]) for s in sites])
    nmse_enc = t["enc_err"].mean((1, 2)) / var_sparse.clamp_min(1e-12)
    nmse_dec = t["dec_err"].mean((1, 2)) / var_dense.clamp_min(1e-12)
    lm = torch.stack([t[f"ce_{h}"].mean() for h in HYBRIDS]).mean()
    kl = torch.stack([t[f"kl_dense_{h}"].mean((1, 2)) for h in HYBRIDS]).sum(0)
    nmse = nmse_enc + nmse_dec
    total = lm_coef * lm + nmse_coef * nmse.sum() + kl_coef * kl.sum()
    parts = {
        "loss": float(total.detach()),
        "lm": float(lm.detach()),
        "nmse_enc": float(nmse_enc.detach().mean()),
        "nmse_dec": float(nmse_dec.detach().mean()),
        "kl": float(kl.detach().mean() / 2),
    }
    return total, parts
