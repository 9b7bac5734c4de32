"""Feature sources: one interface over MLP neurons, residual directions and SAE features.

A :class:`FeatureSource` reads a site's activation vectors and gives each token one
activation per feature (:meth:`~FeatureSource.encode`), and says what one unit of each
feature is in the site's space (:meth:`~FeatureSource.site_directions`): a basis vector for a
neuron, the direction itself for a probe or PCA direction, the decoder row for an SAE feature.
Everything downstream (dashboards, ablation, logit attribution, drift) is written against this
interface, so a new kind of feature is one more class here.

Mean ablation of feature i replaces its activation by its mean and leaves the rest of the
vector alone: ``x + (mean_i - a_i(x)) · dir_i``. For an SAE this keeps the reconstruction
error in place (only the feature's own contribution changes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from nnobs.core.errors import NnobsError
from nnobs.data.windows import Windows
from nnobs.features.sae import SparseAutoencoder, check_sae_fits, sae_summary
from nnobs.features.stream import STREAM_KINDS, site_batches, site_width
from nnobs.interventions.direction import probe_from_observe
from nnobs.models.adapter import Edit, ModelAdapter
from nnobs.models.sites import site_kind


class FeatureSource:
    """Features of one site. Subclasses set ``kind`` and implement :meth:`encode` and
    :meth:`site_directions`; ``labels`` name features where they have names (PCA, probe)."""

    kind = "features"

    def __init__(self, site: str, n_features: int, labels: list[str] | None = None) -> None:
        self.site, self.n_features, self.labels = site, n_features, labels

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(n, d) site activations → (n, n_features) feature activations."""
        raise NotImplementedError

    def site_directions(self) -> torch.Tensor:
        """(n_features, d): what one unit of each feature is in the site's space."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "site": self.site, "n_features": self.n_features}

    def ablate_edit(self, index: int, mean: float) -> Edit:
        """An edit setting feature ``index`` to ``mean`` at every position (mean ablation)."""
        direction = self.site_directions()[index]

        def edit(h: torch.Tensor) -> torch.Tensor:
            a = self.encode(h.flatten(0, -2).float())[:, index].view(*h.shape[:-1], 1)
            return h + ((mean - a) * direction.to(h.device)).to(h.dtype)

        return edit


class NeuronSource(FeatureSource):
    """The neurons of an MLP (``blocks.{l}.mlp_hidden``): each coordinate is a feature."""

    kind = "neurons"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def site_directions(self) -> torch.Tensor:
        return torch.eye(self.n_features)


class DirectionSource(FeatureSource):
    """Directions in a site's space (rows of ``directions``, unit norm): the probe direction of
    an observe result, principal components. A token's activation is its projection."""

    kind = "directions"

    def __init__(
        self,
        site: str,
        directions: np.ndarray | torch.Tensor,
        labels: list[str],
        info: dict[str, Any] | None = None,
    ) -> None:
        d = torch.as_tensor(np.asarray(directions, dtype=np.float32))
        norms = d.norm(dim=1, keepdim=True)
        if d.dim() != 2 or not torch.isfinite(d).all() or (norms == 0).any():
            raise NnobsError("directions must be finite, nonzero rows of one width")
        super().__init__(site, len(d), labels)
        self.directions, self.info = d / norms, dict(info or {})

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.directions.to(x.device).T

    def site_directions(self) -> torch.Tensor:
        return self.directions

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "labels": self.labels, **self.info}


class SAESource(FeatureSource):
    """The features of a sparse autoencoder trained on the site."""

    kind = "sae"

    def __init__(self, sae: SparseAutoencoder, path: str | None = None) -> None:
        super().__init__(sae.site, sae.d_sae)
        self.sae, self.path = sae, path

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.sae.to(x.device).encode(x)

    def site_directions(self) -> torch.Tensor:
        return self.sae.W_dec.detach().cpu()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "sae": sae_summary(self.sae, self.path)}


def sae_source(adapter: ModelAdapter, sae: SparseAutoencoder, site: str, path: str) -> SAESource:
    """An SAE as a feature source of ``site``, refused if it was trained on another site or
    width."""
    check_sae_fits(sae, site, site_width(adapter, site))
    return SAESource(sae, path)


def neuron_source(adapter: ModelAdapter, site: str) -> NeuronSource:
    if site_kind(site) != "mlp_hidden":
        raise NnobsError(f"neurons are read at blocks.<l>.mlp_hidden, not {site}")
    return NeuronSource(site, site_width(adapter, site))


def probe_direction(observe_doc: dict) -> tuple[str, int, np.ndarray]:
    """(site, layer, unit direction) of the probe stored in an ``nnobs observe`` result."""
    layer, direction = probe_from_observe(observe_doc)
    return observe_doc["probe"].get("site") or f"blocks.{layer}.resid_post", layer, direction


def probe_source(observe_doc: dict) -> DirectionSource:
    """The probe direction stored in an ``nnobs observe`` result, at the probe's site."""
    site, layer, direction = probe_direction(observe_doc)
    return DirectionSource(site, direction[None], ["probe"], {"layer": layer})


def pca_source(
    adapter: ModelAdapter, windows: Windows, site: str, n_components: int, batch_size: int = 16
) -> DirectionSource:
    """The site's top principal components over ``windows``, from a covariance accumulated one
    batch at a time (memory: one d × d matrix)."""
    width = site_width(adapter, site)
    if not 1 <= n_components <= width:
        raise NnobsError(f"n_components must be in 1..{width} for {site}, got {n_components}")
    total = torch.zeros(width, dtype=torch.float64)
    outer = torch.zeros(width, width, dtype=torch.float64)
    n = 0
    for batch in site_batches(adapter, windows, site, batch_size):
        x = batch.acts[batch.valid].double().cpu()
        total += x.sum(0)
        outer += x.T @ x
        n += len(x)
    mean = total / n
    cov = outer / n - torch.outer(mean, mean)
    values, vectors = torch.linalg.eigh(cov)
    order = values.argsort(descending=True)[:n_components]
    share = (values[order] / values.clamp_min(0).sum()).tolist()
    labels = [f"pc{i}" for i in range(n_components)]
    return DirectionSource(
        site, vectors[:, order].T.numpy(), labels, {"explained_variance_ratio": share}
    )


def stream_directions(adapter: ModelAdapter, source: FeatureSource) -> torch.Tensor | None:
    """(n_features, d_model): what each feature writes into the residual stream, or None where
    that is not known (a Hugging Face model's MLP neurons)."""
    kind = site_kind(source.site)
    dirs = source.site_directions().float()
    if kind in (*STREAM_KINDS, "final"):
        return dirs
    model = adapter.model
    if kind == "mlp_hidden" and hasattr(model, "blocks"):
        layer = int(source.site.split(".")[1])
        down = model.blocks[layer].mlp.down.weight.detach().float().cpu()  # (d_model, width)
        return dirs @ down.T
    return None


def direct_logits(
    adapter: ModelAdapter, source: FeatureSource, features: slice = slice(None)
) -> torch.Tensor | None:
    """(n_features, vocab): each feature's direct effect on the logits per unit of activation,
    through the final norm and the unembedding of an nnobs model (``features``: some rows only,
    to bound memory with a large vocabulary).

    The final norm is handled as the field does (TransformerLens's folding): its gain is folded
    into the unembedding and a LayerNorm's centring applied, while its division by the token's
    scale is left out, since that positive per-token factor does not change which tokens a
    direction promotes. A feature read after the final norm (``final``) goes to the unembedding
    as is. None where the readout is not an nnobs model's."""
    dirs = stream_directions(adapter, source)
    model = adapter.model
    if dirs is None or not hasattr(model, "unembed") or not hasattr(model, "final_norm"):
        return None
    if site_kind(source.site) != "final":
        norm = model.final_norm
        if isinstance(norm, torch.nn.LayerNorm):
            dirs = dirs - dirs.mean(1, keepdim=True)
        weight = getattr(norm, "weight", None)
        if weight is not None:
            dirs = dirs * weight.detach().float().cpu()
    return dirs[features] @ model.unembed.weight.detach().float().cpu().T


class SubsetSource(FeatureSource):
    """Some features of another source, under their original indices (as labels)."""

    def __init__(self, source: FeatureSource, indices: list[int]) -> None:
        super().__init__(source.site, len(indices), [f"{source.kind} {i}" for i in indices])
        self.source, self.indices, self.kind = source, list(indices), source.kind

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.source.encode(x)[:, self.indices]

    def site_directions(self) -> torch.Tensor:
        return self.source.site_directions()[self.indices]

    def describe(self) -> dict[str, Any]:
        return {**self.source.describe(), "n_features": self.n_features, "indices": self.indices}
