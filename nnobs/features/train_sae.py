"""Training a TopK sparse autoencoder on a site's activations, streamed from the model.

Activations arrive one forward pass at a time (:func:`~nnobs.features.stream.site_batches`)
and pass through a shuffle buffer of fixed size, so memory is bounded by the buffer whatever
the token budget, and consecutive training batches mix many documents. The objective is the
reconstruction error normalised by the activations' variance (scale-free, so one learning
rate fits every site), plus the auxiliary loss for dead features of Gao et al. (2024): the
``d_in / 2`` largest pre-activations among features that have not fired for ``dead_tokens``
tokens are asked to reconstruct what the live features missed, so they come back to life
instead of staying dead. Decoder rows are kept at unit norm.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from nnobs.core.errors import NnobsError
from nnobs.core.fields import check_bool, check_int, check_number
from nnobs.data.windows import Windows
from nnobs.features.sae import SparseAutoencoder
from nnobs.features.stream import site_batches, site_width
from nnobs.models.adapter import ModelAdapter


@dataclass(frozen=True)
class SAESettings:
    """The dictionary and how it is trained; stored in the SAE's ``cfg.json`` metadata.

    ``d_sae`` features (0: ``expansion`` × the site's width), ``k`` active per token;
    ``lr`` 0 means 2e-4 / sqrt(d_sae / 16384) (Gao et al.'s scaling rule); ``tokens`` the
    training budget; ``batch_tokens`` rows per optimiser step; ``buffer_tokens`` the shuffle
    buffer; ``dead_tokens`` how long a feature may stay silent before the auxiliary loss
    takes it up; ``aux_coef`` that loss's weight; ``resample``: at most once every
    ``dead_tokens`` tokens, in the first three quarters of the budget, give each dead feature
    the direction of a badly reconstructed activation (drawn in proportion to its squared
    error) and start it again."""

    d_sae: int = 0
    expansion: int = 8
    k: int = 16
    lr: float = 0.0
    tokens: int = 200_000
    batch_tokens: int = 1024
    buffer_tokens: int = 32_768
    dead_tokens: int = 50_000
    aux_coef: float = 1 / 32
    resample: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("d_sae", self.d_sae, 0)
        for name in ("expansion", "k", "tokens", "batch_tokens", "buffer_tokens", "dead_tokens"):
            check_int(name, getattr(self, name), 1)
        check_number("lr", self.lr, 0)
        check_number("aux_coef", self.aux_coef, 0)
        check_int("seed", self.seed, 0)
        check_bool("resample", self.resample)
        if self.buffer_tokens < 2 * self.batch_tokens:
            raise NnobsError("buffer_tokens must hold at least two training batches")

    def width(self, d_in: int) -> int:
        return self.d_sae or self.expansion * d_in

    def learning_rate(self, d_in: int) -> float:
        return self.lr or 2e-4 / math.sqrt(self.width(d_in) / 2**14)


def shuffled(
    chunks: Iterable[torch.Tensor], buffer_tokens: int, batch_tokens: int, seed: int
) -> Iterator[torch.Tensor]:
    """Batches of ``batch_tokens`` rows drawn from a buffer of ``buffer_tokens`` rows that is
    refilled from ``chunks``: rows from many chunks mix, and at most the buffer is held."""
    generator = torch.Generator().manual_seed(seed)
    buffer: list[torch.Tensor] = []
    held = 0
    for chunk in chunks:
        buffer.append(chunk)
        held += len(chunk)
        if held < buffer_tokens:
            continue
        rows = torch.cat(buffer)
        rows = rows[torch.randperm(len(rows), generator=generator).to(rows.device)]
        keep = len(rows) // 2  # half stays to mix with what comes next
        for first in range(keep, len(rows) - batch_tokens + 1, batch_tokens):
            yield rows[first : first + batch_tokens]
        buffer, held = [rows[:keep]], keep
    if held:
        rows = torch.cat(buffer)
        rows = rows[torch.randperm(len(rows), generator=generator).to(rows.device)]
        for first in range(0, len(rows), batch_tokens):
            yield rows[first : first + batch_tokens]


class TopKSAETrainer:
    """Fits a TopK :class:`SparseAutoencoder` to streamed activation rows (scikit-learn style:
    settings in ``__init__``, ``fit`` returns self, learned state with a trailing underscore).

    After ``fit``: ``sae_``, ``n_tokens_`` (rows trained on), ``history_`` (step, normalised
    MSE, L0, dead fraction), ``dead_fraction_`` (features silent for ``dead_tokens`` at the end).
    """

    def __init__(self, settings: SAESettings, site: str) -> None:
        self.settings, self.site = settings, site

    def _init(self, first: torch.Tensor) -> None:
        s, d_in = self.settings, first.shape[1]
        generator = torch.Generator().manual_seed(s.seed)
        sae = SparseAutoencoder(d_in, s.width(d_in), s.k, site=self.site)
        sae.to(first.device)
        with torch.no_grad():
            sae.W_dec.copy_(torch.randn(sae.d_sae, d_in, generator=generator))
            sae.normalize_decoder()
            sae.W_enc.copy_(sae.W_dec.T)
            sae.b_dec.copy_(first.mean(0))
        self.sae_ = sae
        # The mean squared distance to the mean: reconstruction error is measured against it.
        self.scale_ = float(((first - first.mean(0)) ** 2).sum(1).mean().clamp_min(1e-12))
        self.optimizer_ = torch.optim.Adam(sae.parameters(), lr=s.learning_rate(d_in))
        self.silent_ = torch.zeros(sae.d_sae, dtype=torch.long, device=first.device)
        self.n_tokens_, self.history_, self.resampled_, self.last_resample_ = 0, [], 0, 0
        self.generator_ = generator

    def _aux_loss(self, x: torch.Tensor, pre: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        dead = self.silent_ >= self.settings.dead_tokens
        n_dead = int(dead.sum())
        if n_dead == 0 or self.settings.aux_coef == 0:
            return recon.new_zeros(())
        k_aux = min(x.shape[1] // 2, n_dead)
        masked = torch.where(dead, pre, torch.full_like(pre, -math.inf))
        top = masked.topk(k_aux, dim=-1)
        acts = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
        missed = (x - recon).detach()
        return ((acts @ self.sae_.W_dec - missed) ** 2).sum(1).mean() / self.scale_

    @torch.no_grad()
    def _resample(self, x: torch.Tensor, recon: torch.Tensor) -> None:
        """Restart dead features on the directions of badly reconstructed rows of ``x``."""
        s, sae = self.settings, self.sae_
        due = self.n_tokens_ - self.last_resample_ >= s.dead_tokens
        if not s.resample or not due or self.n_tokens_ > 0.75 * s.tokens:
            return
        dead = (self.silent_ >= s.dead_tokens).nonzero().squeeze(1)
        if len(dead) == 0:
            return
        self.last_resample_ = self.n_tokens_
        error = ((x - recon) ** 2).sum(1).float().cpu() + 1e-12
        rows = torch.multinomial(error, len(dead), len(dead) > len(x), generator=self.generator_)
        rows = rows.to(x.device)
        directions = torch.nn.functional.normalize(x[rows] - recon[rows], dim=1)
        live = self.silent_ < s.dead_tokens
        scale = sae.W_enc[:, live].norm(dim=0).mean() * 0.2 if live.any() else 1.0
        sae.W_dec[dead] = directions
        sae.W_enc[:, dead] = directions.T * scale
        sae.b_enc[dead] = 0.0
        for param, index in ((sae.W_dec, (dead,)), (sae.W_enc, (slice(None), dead)),
                             (sae.b_enc, (dead,))):  # fmt: skip
            for moment in self.optimizer_.state.get(param, {}).values():
                if moment.dim():
                    moment[index] = 0.0
        self.silent_[dead] = 0
        self.resampled_ += len(dead)

    def partial_fit(self, x: torch.Tensor) -> TopKSAETrainer:
        """One optimiser step on a batch of rows (the first call initialises from it)."""
        if not hasattr(self, "sae_"):
            self._init(x)
        sae = self.sae_
        pre = sae.pre_activations(x)
        f = sae.activate(pre)
        recon = sae.decode(f)
        nmse = ((recon - x) ** 2).sum(1).mean() / self.scale_
        loss = nmse + self.settings.aux_coef * self._aux_loss(x, pre, recon)
        self.optimizer_.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer_.step()
        sae.normalize_decoder()
        with torch.no_grad():
            fired = (f > 0).any(0)
            self.silent_ = torch.where(fired, 0, self.silent_ + len(x))
            self.n_tokens_ += len(x)
            self._resample(x, recon)
            step = len(self.history_) + 1
            record = {
                "step": step,
                "tokens": self.n_tokens_,
                "nmse": float(nmse),
                "l0": float((f > 0).sum(1).float().mean()),
                "dead_fraction": float((self.silent_ >= self.settings.dead_tokens).float().mean()),
            }
            self.history_.append(record)
        return self

    def fit(self, chunks: Iterable[torch.Tensor], progress: bool = False) -> TopKSAETrainer:
        """Train on rows streamed from ``chunks`` until ``settings.tokens`` rows are used."""
        s = self.settings
        bar = tqdm(total=s.tokens, desc="sae", unit="tok", disable=not progress, leave=False)
        with bar:
            for batch in shuffled(chunks, s.buffer_tokens, s.batch_tokens, s.seed):
                batch = batch[: s.tokens - getattr(self, "n_tokens_", 0)]
                if len(batch) == 0:
                    break
                self.partial_fit(batch)
                bar.update(len(batch))
        if not hasattr(self, "sae_"):
            raise NnobsError("no activations to train the SAE on")
        self.dead_fraction_ = float((self.silent_ >= s.dead_tokens).float().mean())
        self.sae_.requires_grad_(False)
        self.sae_.metadata["nnobs_training"] = {
            **asdict(self.settings),
            "d_sae": self.sae_.d_sae,
            "lr": s.learning_rate(self.sae_.d_in),
            "tokens_trained": self.n_tokens_,
            "final_nmse": float(np.mean([h["nmse"] for h in self.history_[-20:]])),
            "dead_fraction": self.dead_fraction_,
            "resampled": self.resampled_,
        }
        return self


def train_site_sae(
    adapter: ModelAdapter,
    site: str,
    windows: Windows,
    settings: SAESettings,
    batch_size: int = 16,
    progress: bool = False,
) -> TopKSAETrainer:
    """A TopK SAE fitted to ``site``'s activations over ``windows``, streamed from the model."""
    site_width(adapter, site)  # refuses a site without per-token vectors
    chunks = (b.acts[b.valid] for b in site_batches(adapter, windows, site, batch_size))
    return TopKSAETrainer(settings, site).fit(chunks, progress=progress)


def budget_settings(tokens: int, **changes) -> SAESettings:
    """Settings for a ``tokens`` budget: batch, buffer and dead-feature horizon shrunk to fit
    small budgets (a budget smaller than the buffer would otherwise train on one shuffle)."""
    return SAESettings(
        tokens=tokens,
        batch_tokens=min(1024, max(1, tokens // 8)),
        buffer_tokens=min(32_768, max(2, tokens // 4)),
        dead_tokens=min(50_000, max(1, tokens // 4)),
        **changes,
    )
