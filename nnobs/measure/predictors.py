"""Loss predictors: regressions of per-token loss that the protocol controls for.

:class:`LossMLP` reads the activations (the output-controlled residual); :class:`NonlinearControl`
reads a few covariates such as max softmax and the activation norm (the ``nonlinear`` control
set). Both follow scikit-learn's conventions: parameters stored as given, ``fit`` returns the
estimator, learned state ends in an underscore.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.ensemble import HistGradientBoostingRegressor

from nnobs.core.errors import NnobsError
from nnobs.measure.arrays import (
    activation_shape,
    check_width,
    chunk_rows,
    row_blocks,
    to_tensor,
    weighted_moments,
)
from nnobs.measure.stats import as_covariates, as_vector


class LossMLP:
    """Predicts per-token loss from (last-layer) activations: MLP d→hidden→1, ReLU, MSE.

    The output-controlled residual adds its prediction as a covariate: what a probe still
    explains beyond it is signal an output-side predictor cannot see. Inputs and target are
    standardised (train-row statistics); Adam with coupled weight decay as in the reference;
    training stops when the loss on a held-out ``val_fraction`` of rows has not improved for
    ``patience`` epochs, and the best epoch's weights are kept. A seed sets the split, the
    initialisation and the batch order.
    """

    def __init__(
        self,
        hidden: int = 64,
        epochs: int = 50,
        seed: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        batch_size: int = 1024,
        val_fraction: float = 0.1,
        patience: int = 3,
        device: str = "cpu",
    ) -> None:
        self.hidden = hidden
        self.epochs = epochs
        self.seed = seed
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.patience = patience
        self.device = device

    def fit(self, X: np.ndarray, loss: np.ndarray) -> LossMLP:
        if not 0 < self.val_fraction < 1:
            raise NnobsError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        n, d = activation_shape(X)
        target = as_vector("loss", loss, n)
        n_val = int(round(self.val_fraction * n))
        if n_val < 1 or n - n_val < 2:
            raise NnobsError(f"LossMLP needs more rows to hold out a validation part, got {n}")
        dev = torch.device(self.device)
        gen = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(n, generator=gen).numpy()
        val_rows, train_rows = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        Xtr, Xva = to_tensor(X, train_rows, dev), to_tensor(X, val_rows, dev)
        uniform = torch.full((len(Xtr),), 1.0 / len(Xtr), dtype=torch.float64, device=dev)
        mean, cov = weighted_moments(Xtr, uniform)
        self.x_mean_ = mean.float()
        std = torch.diagonal(cov).sqrt()
        # a constant column carries nothing; scale 1 keeps it from blowing up elsewhere
        self.x_std_ = torch.where(std > 1e-8 * std.max(), std, torch.ones_like(std)).float()
        self.y_mean_ = float(target[train_rows].mean())
        self.y_std_ = float(target[train_rows].std() or 1.0)
        standard = torch.as_tensor((target - self.y_mean_) / self.y_std_, dtype=torch.float32)
        ytr, yva = standard[train_rows].to(dev), standard[val_rows].to(dev)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.net_ = torch.nn.Sequential(
                torch.nn.Linear(d, self.hidden), torch.nn.ReLU(), torch.nn.Linear(self.hidden, 1)
            ).to(dev)
        opt = torch.optim.Adam(self.net_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        best, best_state, stale = math.inf, None, 0
        self.n_epochs_ = 0
        for _ in range(self.epochs):
            self.net_.train()
            order = torch.randperm(len(train_rows), generator=gen).to(dev)
            for a in range(0, len(order), self.batch_size):
                idx = order[a : a + self.batch_size]
                pred = self._forward(Xtr[idx])
                step_loss = F.mse_loss(pred, ytr[idx])
                opt.zero_grad(set_to_none=True)
                step_loss.backward()
                opt.step()
            self.n_epochs_ += 1
            val = float(F.mse_loss(self._predict_tensor(Xva), yva))
            if val < best:
                best, stale = val, 0
                best_state = {k: t.detach().clone() for k, t in self.net_.state_dict().items()}
            else:
                stale += 1
                if stale >= self.patience:
                    break
        self.net_.load_state_dict(best_state)
        self.val_mse_ = best * self.y_std_**2
        return self

    def _forward(self, xb: torch.Tensor) -> torch.Tensor:
        return self.net_((xb - self.x_mean_) / self.x_std_).squeeze(-1)

    def _predict_tensor(self, Xt: torch.Tensor) -> torch.Tensor:
        self.net_.eval()
        step = chunk_rows(Xt.shape[1])
        with torch.no_grad():
            return torch.cat([self._forward(Xt[a : a + step]) for a in range(0, len(Xt), step)])

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted loss per row (in loss units), float64; reads ``X`` in row chunks."""
        if not hasattr(self, "net_"):
            raise NnobsError("LossMLP is not fitted; call fit() first")
        check_width(X, self.net_[0].in_features)
        out = np.empty(X.shape[0])
        self.net_.eval()
        for a, b, block in row_blocks(X):
            with torch.no_grad():
                out[a:b] = self._forward(block.to(self.device)).double().cpu().numpy()
        return out * self.y_std_ + self.y_mean_


class NonlinearControl:
    """A flexible regression of loss on a few covariates (max softmax, norm): the
    ``nonlinear`` control set, which removes any monotone or non-monotone dependence of loss on
    confidence that a linear control would leave in.

    Gradient-boosted trees (histogram-based): fast on millions of rows, insensitive to the
    covariates' scales, and early-stopped on a held-out 10%.
    """

    def __init__(self, seed: int = 0, max_iter: int = 200) -> None:
        self.seed = seed
        self.max_iter = max_iter

    def fit(self, covariates: np.ndarray, loss: np.ndarray) -> NonlinearControl:
        loss = as_vector("loss", loss)
        c = as_covariates(covariates, len(loss))
        self.model_ = HistGradientBoostingRegressor(
            max_iter=self.max_iter, early_stopping=True, random_state=self.seed
        ).fit(c, loss)
        return self

    def predict(self, covariates: np.ndarray) -> np.ndarray:
        if not hasattr(self, "model_"):
            raise NnobsError("NonlinearControl is not fitted; call fit() first")
        c = as_covariates(covariates, k=self.model_.n_features_in_, fitting=False)
        return self.model_.predict(c)
