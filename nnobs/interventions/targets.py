"""What an intervention touches, and the edits that change it.

A :class:`Target` names a hook site of a :class:`~nnobs.models.adapter.ModelAdapter`, optionally
narrowed to some positions, some attention heads (``head_out``, ``attn_pattern``), some MLP
neurons (``mlp_hidden``), or the component along one direction of the site's last axis.
Edits built here are plain functions ``activation -> replacement`` for ``adapter.hooks``, so
the same target works on nnobs and Hugging Face models alike. Ablation, patching and the
direction test are built from them.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nnobs.core.errors import NnobsError
from nnobs.models.adapter import Edit, ModelAdapter
from nnobs.models.sites import SITE_KINDS, site_kind

SCHEMA = "nnobs.interventions"
SCHEMA_VERSION = 1


def _axes(site: str) -> tuple[int, int | None]:
    """(position axis, axis of heads or neurons) of ``site``; a name that is no site kind gets
    (1, None) and is refused when the adapter resolves it."""
    kind = SITE_KINDS.get(site_kind(site))
    return (1, None) if kind is None else (kind.position_axis, kind.unit_axis)


def position_axis(site: str) -> int:
    return _axes(site)[0]


# Site shapes per model, learnt from one tiny forward pass (a model's shapes never change).
_SHAPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def site_shape(adapter: ModelAdapter, site: str) -> tuple[int, ...]:
    """The activation's shape at ``site`` for one one-token prompt (checks the site exists)."""
    adapter.resolve(site)
    shapes = _SHAPES.setdefault(adapter.model, {})
    if site not in shapes:
        ids = torch.zeros(1, 1, dtype=torch.long, device=adapter.device)
        _, cache = adapter.run_with_cache(ids, [site])
        shapes[site] = tuple(cache[site].shape)
    return shapes[site]


@dataclass(frozen=True, eq=False)
class Target:
    """A site, or part of one. ``None`` means all positions / heads / neurons.

    ``positions`` index the sequence (negative counts from the end); ``heads`` apply to
    ``head_out`` and ``attn_pattern``, ``neurons`` to ``mlp_hidden``. With ``direction``
    (a unit vector along the site's last axis) only the activation's component along it is
    touched. Build one with :func:`make_target`, which checks it against the model.
    """

    site: str
    positions: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    neurons: tuple[int, ...] | None = None
    direction: torch.Tensor | None = None

    def describe(self) -> dict:
        """JSON-able description for results."""
        return {
            "site": self.site,
            "positions": list(self.positions) if self.positions is not None else None,
            "heads": list(self.heads) if self.heads is not None else None,
            "neurons": list(self.neurons) if self.neurons is not None else None,
            "direction": self.direction is not None,
        }


def _indices(name: str, values: Sequence[int] | None, size: int | None, site: str):
    if values is None:
        return None
    values = tuple(int(v) for v in values)
    if not values:
        raise NnobsError(f"empty list of {name} for {site!r}: leave it out to mean all {name}")
    if size is not None:
        for v in values:
            if not 0 <= v < size:
                raise NnobsError(
                    f"{name[:-1]} index {v} is out of range: {site!r} has {size} {name} "
                    f"(0..{size - 1})"
                )
    return values


def make_target(
    adapter: ModelAdapter,
    site: str,
    *,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    neurons: Sequence[int] | None = None,
    direction: np.ndarray | torch.Tensor | Sequence[float] | None = None,
) -> Target:
    """A :class:`Target` checked against ``adapter``: the site exists, head and neuron
    indices are in range, the direction has the site's width (it is normalised to unit
    length). Positions are checked when a prompt's length is known."""
    shape = site_shape(adapter, site)
    kind = site_kind(site)
    if heads is not None and kind not in ("head_out", "attn_pattern"):
        raise NnobsError(f"heads apply to head_out and attn_pattern sites, not {site!r}")
    if neurons is not None and kind != "mlp_hidden":
        raise NnobsError(f"neurons apply to mlp_hidden sites, not {site!r}")
    unit_axis = _axes(site)[1]
    size = shape[unit_axis] if unit_axis is not None else None
    unit = None
    if direction is not None:
        if kind in ("head_out", "attn_pattern") or neurons is not None:
            raise NnobsError(
                f"a direction acts on a site's whole feature axis: give it without heads or "
                f"neurons, on a site other than head_out/attn_pattern (got {site!r})"
            )
        unit = torch.as_tensor(np.asarray(direction, dtype=np.float32)).flatten()
        if unit.numel() != shape[-1]:
            raise NnobsError(
                f"direction has {unit.numel()} values but {site!r} has width {shape[-1]}"
            )
        norm = float(unit.norm())
        if not np.isfinite(norm) or norm == 0:
            raise NnobsError("direction must be a finite, non-zero vector")
        unit = unit / norm
    return Target(
        site,
        positions=_indices("positions", positions, None, site),
        heads=_indices("heads", heads, size, site),
        neurons=_indices("neurons", neurons, size, site),
        direction=unit,
    )


def _mask(target: Target, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
    """Boolean mask broadcastable to ``shape`` selecting the target, or None for everything.

    With a direction the last axis is left out (size 1): the edit acts along it."""
    pos_axis, unit_axis = _axes(target.site)
    dims = [1] * len(shape)
    mask = None
    if target.positions is not None:
        length = shape[pos_axis]
        for p in target.positions:
            if not -length <= p < length:
                raise NnobsError(
                    f"position {p} is out of range for prompts of {length} tokens at "
                    f"{target.site!r}"
                )
        sel = torch.zeros(length, dtype=torch.bool, device=device)
        sel[[p % length for p in target.positions]] = True
        dims[pos_axis] = length
        mask = sel.view(dims)
    units = target.heads if target.heads is not None else target.neurons
    if units is not None:
        sel = torch.zeros(shape[unit_axis], dtype=torch.bool, device=device)
        sel[list(units)] = True
        dims = [1] * len(shape)
        dims[unit_axis] = shape[unit_axis]
        mask = sel.view(dims) if mask is None else mask & sel.view(dims)
    return mask


def _component(x: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    return (x * unit).sum(-1, keepdim=True)


def replace_edit(target: Target, replacement: torch.Tensor | float) -> Edit:
    """Set the target's part of the activation to ``replacement``.

    ``replacement`` broadcasts against the activation: ``0.0`` (zero ablation), a mean over
    a reference corpus of the site's trailing shape (mean ablation), or activations of
    other inputs with the full shape (resample ablation, patching). With a direction only
    the component along it is replaced by ``replacement``'s component.
    """

    def edit(x: torch.Tensor) -> torch.Tensor:
        r = torch.as_tensor(replacement, dtype=x.dtype, device=x.device)
        mask = _mask(target, x.shape, x.device)
        if target.direction is None:
            if mask is None:
                return r.expand_as(x).clone()
            return torch.where(mask, r, x)
        unit = target.direction.to(dtype=x.dtype, device=x.device)
        r_comp = _component(r if r.dim() else r.expand(unit.shape), unit)
        delta = r_comp - _component(x, unit)
        if mask is not None:
            delta = torch.where(mask, delta, torch.zeros((), dtype=x.dtype, device=x.device))
        return x + delta * unit

    return edit


def scale_edit(target: Target, factor: float) -> Edit:
    """Multiply the target's part of the activation (or its component along the direction)
    by ``factor``: 0 removes it, 1 leaves it, 2 doubles it."""

    def edit(x: torch.Tensor) -> torch.Tensor:
        mask = _mask(target, x.shape, x.device)
        if target.direction is None:
            scaled = x * factor
            return scaled if mask is None else torch.where(mask, scaled, x)
        unit = target.direction.to(dtype=x.dtype, device=x.device)
        delta = (factor - 1.0) * _component(x, unit)
        if mask is not None:
            delta = torch.where(mask, delta, torch.zeros((), dtype=x.dtype, device=x.device))
        return x + delta * unit

    return edit


def project_out(target: Target) -> Edit:
    """Remove the component along ``target.direction`` (the activation minus its projection)."""
    if target.direction is None:
        raise NnobsError("projecting out needs a direction: give the target one")
    return replace_edit(target, 0.0)


def result_document(adapter: ModelAdapter, kind: str, settings: dict, **body: object) -> dict:
    """A result document of ``kind`` (ablation, direction, patching, attribution) with the
    model's provenance; validated against ``core/schemas/interventions.schema.json`` on write."""
    from nnobs.models.adapter import provenance

    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "provenance": provenance(adapter),
        "settings": settings,
        **body,
    }
