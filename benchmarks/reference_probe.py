"""The reference probe solver, kept for comparison with :class:`nnobs.measure.probes.LinearProbe`.

Benchmark code, not part of the package: ``bench_probe.py`` times it against ``LinearProbe``
and ``reference_protocol.py`` trains every probe with it, as the reference research code does.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from nnobs.measure.arrays import activation_shape, to_tensor
from nnobs.measure.probes import BinaryProbe, binary_labels


class ReferenceAdamProbe(BinaryProbe):
    """``Linear(d, 1)`` trained with Adam (lr 1e-3, coupled weight decay 1e-4),
    BCE-with-logits, 20 epochs, batch 4096, all rows.

    A seed sets the initialisation (``nn.Linear``'s default uniform ±1/sqrt(d)) and the batch
    order, through one ``torch.Generator``; global RNG state is untouched. Batches are slices
    of a per-epoch random permutation, the sampling ``DataLoader(shuffle=True)`` performs.
    """

    def __init__(
        self,
        seed: int = 42,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        epochs: int = 20,
        batch_size: int = 4096,
        device: str = "cpu",
    ) -> None:
        self.seed = seed
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.device = device

    @property
    def l2(self) -> float:
        """The objective's penalty: coupled weight decay adds ``weight_decay · θ`` to the
        gradient, which is the gradient of ``(weight_decay/2)|θ|²``."""
        return self.weight_decay

    def fit(
        self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None
    ) -> ReferenceAdamProbe:
        """Fit on all rows; ``groups`` is accepted for interchangeability with ``LinearProbe``
        and unused (the reference's seeds vary initialisation and order, not data)."""
        n, d = activation_shape(X)
        dev = torch.device(self.device)
        yt = torch.as_tensor(binary_labels(y, n), dtype=torch.float32, device=dev)
        Xt = to_tensor(X, device=dev)
        gen = torch.Generator().manual_seed(self.seed)
        bound = 1.0 / math.sqrt(d)
        w = ((torch.rand(d, generator=gen) * 2 - 1) * bound).to(dev).requires_grad_(True)
        b = ((torch.rand(1, generator=gen) * 2 - 1) * bound).to(dev).requires_grad_(True)
        opt = torch.optim.Adam([w, b], lr=self.lr, weight_decay=self.weight_decay)
        for _ in range(self.epochs):
            perm = torch.randperm(n, generator=gen).to(dev)
            for a in range(0, n, self.batch_size):
                idx = perm[a : a + self.batch_size]
                loss = F.binary_cross_entropy_with_logits(Xt[idx] @ w + b, yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        self.coef_ = w.detach().double().cpu().numpy()
        self.intercept_ = float(b.detach())
        return self
