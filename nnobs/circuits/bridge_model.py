"""Bridges between a dense and a sparse model's residual streams (Gao et al. 2025).

One encoder/decoder pair per sublayer: at the stream entering each attention
(``blocks.{l}.resid_pre``) and each MLP (``blocks.{l}.resid_mid``). The encoder maps the
dense model's stream to the sparse model's, a linear map followed by AbsTopK (keep the ``k``
entries of largest magnitude, zero the rest: the sparse model's stream is itself nearly
sparse); the decoder maps the sparse stream back, linear. :class:`Bridges` holds every pair;
it is saved as ``bridges.safetensors`` beside the JSON that names the two models.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from nnobs.core.errors import NnobsError, first_line
from nnobs.models.adapter import ModelAdapter
from nnobs.models.checkpoint import load_safetensors

WEIGHTS_FILE = "bridges.safetensors"


def bridge_sites(n_layers: int) -> list[str]:
    """The residual stream entering every sublayer, in forward order."""
    return [f"blocks.{l}.{kind}" for l in range(n_layers) for kind in ("resid_pre", "resid_mid")]


def site_key(site: str) -> str:
    """A module name for a site (``blocks.0.resid_pre`` → ``blocks_0_resid_pre``)."""
    return site.replace(".", "_")


def abs_top_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x`` with all but the ``k`` entries of largest magnitude on its last axis zeroed (the
    gradient flows through the kept entries)."""
    if k >= x.shape[-1]:
        return x
    keep = x.abs().topk(k, dim=-1).indices
    return x * torch.zeros_like(x).scatter_(-1, keep, 1.0)


def check_pair(dense: ModelAdapter, sparse: ModelAdapter, dense_name: str, sparse_name: str):
    """Refuse, in one line naming both, two models a bridge cannot join: different vocabularies
    (tokenizers) or depths."""
    problems = []
    if dense.vocab_size != sparse.vocab_size:
        problems.append(f"vocabulary {dense.vocab_size} vs {sparse.vocab_size} tokens")
    dense_tok = getattr(dense.tokenizer, "fingerprint", None)
    sparse_tok = getattr(sparse.tokenizer, "fingerprint", None)
    if dense_tok != sparse_tok:
        problems.append(f"tokenizer {dense_tok} vs {sparse_tok}")
    if dense.n_layers != sparse.n_layers:
        problems.append(f"depth {dense.n_layers} vs {sparse.n_layers} layers")
    if problems:
        raise NnobsError(
            f"cannot bridge dense model {dense_name} and sparse model {sparse_name}: they differ "
            f"in {'; '.join(problems)} (a bridge joins models of one tokenizer and depth)"
        )


def least_squares(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-6):
    """``(W, b)`` minimising ``Σ_rows ||W x + b − y||² + λ ||W||²`` with ``λ = ridge ·
    tr(X_cᵀ X_c)`` (X_c: the centred rows; float64 normal equations)."""
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    gram = xc.T @ xc
    gram += torch.eye(len(gram), dtype=gram.dtype) * ridge * max(float(gram.trace()), 1e-12)
    weight = torch.linalg.solve(gram, xc.T @ yc).T
    return weight.float(), (my - weight @ mx).float()


class Bridges(nn.Module):
    """An encoder (dense → sparse, linear + AbsTopK ``k``) and a decoder (sparse → dense,
    linear) at each of ``sites``."""

    def __init__(self, sites: list[str], d_dense: int, d_sparse: int, k: int) -> None:
        super().__init__()
        if not 1 <= k <= d_sparse:
            raise NnobsError(f"AbsTopK k must be in 1..{d_sparse} (the sparse width), got {k}")
        self.sites, self.d_dense, self.d_sparse, self.k = list(sites), d_dense, d_sparse, k
        self.encoders = nn.ModuleDict({site_key(s): nn.Linear(d_dense, d_sparse) for s in sites})
        self.decoders = nn.ModuleDict({site_key(s): nn.Linear(d_sparse, d_dense) for s in sites})

    def encode(self, site: str, dense_act: torch.Tensor) -> torch.Tensor:
        """The dense stream at ``site`` mapped into the sparse model's stream."""
        return abs_top_k(self.encoders[site_key(site)](dense_act), self.k)

    def decode(self, site: str, sparse_act: torch.Tensor) -> torch.Tensor:
        """The sparse stream at ``site`` mapped into the dense model's stream."""
        return self.decoders[site_key(site)](sparse_act)

    def decoder_column(self, site: str, channel: int) -> torch.Tensor:
        """The dense-stream direction the decoder writes for one sparse channel."""
        if not 0 <= channel < self.d_sparse:
            raise NnobsError(
                f"channel {channel} is out of range: the sparse stream has channels "
                f"0..{self.d_sparse - 1}"
            )
        return self.decoders[site_key(site)].weight[:, channel].detach()

    @torch.no_grad()
    def fit_linear_(
        self, dense_acts: dict[str, torch.Tensor], sparse_acts: dict[str, torch.Tensor]
    ) -> Bridges:
        """Set every encoder and decoder to the least-squares linear map between the two
        streams (rows: tokens), a tiny ridge keeping it defined: the best linear bridge before
        AbsTopK and the hybrid passes are taken into account."""
        for site in self.sites:
            x, y = dense_acts[site].flatten(0, -2), sparse_acts[site].flatten(0, -2)
            for layer, src, dst in ((self.encoders, x, y), (self.decoders, y, x)):
                weight, bias = least_squares(src, dst)
                layer[site_key(site)].weight.copy_(weight)
                layer[site_key(site)].bias.copy_(bias)
        return self

    def save(self, path: str | Path) -> Path:
        """Write the weights as safetensors at ``path`` (atomically: temp file, rename)."""
        from nnobs.core.files import atomic_path

        with atomic_path(path) as tmp:
            safetensors.torch.save_model(self, str(tmp))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, shape: dict) -> Bridges:
        """Bridges of ``shape`` (sites, d_dense, d_sparse and k, as a bridge directory's
        config records them) with the weights at ``path``."""
        bridges = cls(shape["sites"], shape["d_dense"], shape["d_sparse"], shape["k"])
        tensors = load_safetensors(Path(path), "bridge weights")
        try:
            bridges.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            raise NnobsError(
                f"bridge weights {str(path)!r} do not fit its config ({first_line(e)})"
            ) from e
        return bridges
