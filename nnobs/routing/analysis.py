"""Routing mass against causal importance, per source family × sublayer × depth band.

Source families: the embedding, the current (partial) block, and older history (the completed
earlier blocks). For each family, sublayer (attention, MLP) and depth band (the layers split
into equal bands, earliest first), one pass over corpus windows measures per document:

- **mass**: the family's routing weight (summed over its sources), averaged over the band's
  layers (0 where a layer has no such source) and the document's tokens;
- **mask**: the family masked out of the softmax at every route site of the band (the other
  sources renormalised), and
- **fix**: the family's weights fixed to their corpus mean (the others rescaled),

each as the change in next-token loss and the KL divergence from the unedited output,
averaged over the document's tokens. Intervals come from :mod:`nnobs.routing.verdicts`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nnobs.core.errors import NnobsError
from nnobs.data.windows import Windows
from nnobs.models.adapter import Edit, ModelAdapter
from nnobs.models.attnres import FAMILIES, SUBLAYERS, source_family, source_names
from nnobs.routing.edits import fix_sources, mask_sources
from nnobs.routing.verdicts import MEASURES
from nnobs.routing.wrap import routing_blocks


@dataclass(frozen=True)
class Cell:
    """One family × sublayer × depth band: where its sources sit at each route site."""

    family: str
    sublayer: str
    band: str
    sources: dict[str, list[int]]  # route site -> indices of the family's sources
    n_sources: dict[str, int]  # route site -> number of sources there
    layers: int  # layers in the band


def band_names(n_bands: int) -> list[str]:
    """``early``/``late`` for two bands, ``early``/``middle``/``late`` for three."""
    named = {1: ["all"], 2: ["early", "late"], 3: ["early", "middle", "late"]}
    return named.get(n_bands, [f"band {i}" for i in range(n_bands)])


def routing_cells(adapter: ModelAdapter, n_bands: int) -> list[Cell]:
    """Every family × sublayer × band that has a source somewhere in the band."""
    blocks = routing_blocks(adapter)
    if not 1 <= n_bands <= adapter.n_layers:
        raise NnobsError(f"depth bands must be in 1..{adapter.n_layers}, got {n_bands}")
    bands = np.array_split(np.arange(adapter.n_layers), n_bands)
    cells = []
    for sub in SUBLAYERS:
        for name, layers in zip(band_names(n_bands), bands, strict=True):
            names = {
                f"blocks.{l}.route_{sub}": source_names(int(l), sub, adapter.n_layers, blocks)
                for l in layers
            }
            for family in FAMILIES:
                found = {
                    site: [i for i, n in enumerate(ns) if source_family(n) == family]
                    for site, ns in names.items()
                }
                found = {site: idx for site, idx in found.items() if idx}
                if found:
                    sizes = {site: len(names[site]) for site in found}
                    cells.append(Cell(family, sub, name, found, sizes, len(layers)))
    return cells


def cell_edits(cell: Cell, mode: str, means: dict[str, torch.Tensor]) -> dict[str, Edit]:
    """The route-site edits of one cell; a site whose only sources are the family cannot be
    masked (nothing would be left) and is left unedited."""
    edits = {}
    for site, idx in cell.sources.items():
        n = cell.n_sources[site]
        if mode == "mask" and len(idx) < n:
            edits[site] = mask_sources(idx, n)
        elif mode == "fix":
            edits[site] = fix_sources(idx, means[site][idx], n)
    return edits


class _DocTotals:
    """Per-document sums of per-token values, for per-document means."""

    def __init__(self, doc_ids: np.ndarray, n_values: int) -> None:
        self.docs, self.index = np.unique(doc_ids, return_inverse=True)
        self.sums = np.zeros((len(self.docs), n_values))
        self.counts = np.zeros(len(self.docs))

    def add(self, rows: np.ndarray, column: int, per_token: torch.Tensor, valid: torch.Tensor):
        totals = (per_token * valid).sum(1).double().numpy()
        np.add.at(self.sums[:, column], self.index[rows], totals)

    def count(self, rows: np.ndarray, valid: torch.Tensor) -> None:
        np.add.at(self.counts, self.index[rows], valid.sum(1).double().numpy())

    def means(self) -> np.ndarray:
        return self.sums / self.counts[:, None]


def _batches(windows: Windows, batch_size: int):
    for start in range(0, len(windows.input_ids), batch_size):
        rows = np.arange(start, min(start + batch_size, len(windows.input_ids)))
        yield (
            rows,
            torch.as_tensor(windows.input_ids[rows]),
            torch.as_tensor(windows.targets[rows]),
            torch.as_tensor(windows.valid[rows]),
        )


def mean_routing(
    adapter: ModelAdapter, windows: Windows, sites: list[str], batch_size: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Each route site's weights averaged over the windows' valid tokens, and their standard
    deviation over those tokens (float64; zero when routing ignores content)."""
    sums: dict[str, torch.Tensor] = {}
    squares: dict[str, torch.Tensor] = {}
    total = 0
    for _, ids, _, valid in _batches(windows, batch_size):
        _, cache = adapter.run_with_cache(ids.to(adapter.device), sites)
        mask = valid.to(torch.float64).unsqueeze(-1)
        for site in sites:
            weights = cache[site].cpu().double()
            sums[site] = sums.get(site, 0) + (weights * mask).sum(dim=(0, 1))
            squares[site] = squares.get(site, 0) + (weights**2 * mask).sum(dim=(0, 1))
        total += int(valid.sum())
    means = {site: value / total for site, value in sums.items()}
    stds = {s: (squares[s] / total - means[s] ** 2).clamp_min(0).sqrt() for s in sites}
    return means, stds


def _token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view(
        targets.shape
    )


def measure_routing(
    adapter: ModelAdapter,
    windows: Windows,
    cells: list[Cell],
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """Per-document measures, (documents, cells, MEASURES), and each route site's standard
    deviation of weights over tokens."""
    sites = sorted({site for cell in cells for site in cell.sources})
    means, stds = mean_routing(adapter, windows, sites, batch_size)
    plans = [
        (cell, cell_edits(cell, "mask", means), cell_edits(cell, "fix", means)) for cell in cells
    ]
    totals = _DocTotals(windows.doc_ids, len(cells) * len(MEASURES))
    batches = list(_batches(windows, batch_size))
    for rows, ids, targets, valid in tqdm(batches, desc="routing", disable=not progress):
        ids, valid_f = ids.to(adapter.device), valid.float()
        totals.count(rows, valid)
        plain, cache = adapter.run_with_cache(ids, sites)
        plain = plain.cpu().float()
        plain_logp = plain.log_softmax(-1)
        plain_loss = _token_loss(plain, targets)
        for c, (cell, mask, fix) in enumerate(plans):
            mass = sum(cache[s][..., idx].sum(-1).cpu() for s, idx in cell.sources.items())
            base = c * len(MEASURES)
            # Layers of the band without the family's sources count as zero mass.
            totals.add(rows, base, mass / cell.layers, valid_f)
            for offset, edits in ((1, mask), (3, fix)):
                if not edits:
                    continue
                with torch.no_grad(), adapter.hooks(edits=edits):
                    edited = adapter.forward(ids).cpu().float()
                logp = edited.log_softmax(-1)
                kl = (plain_logp.exp() * (plain_logp - logp)).sum(-1)
                totals.add(rows, base + offset, _token_loss(edited, targets) - plain_loss, valid_f)
                totals.add(rows, base + offset + 1, kl, valid_f)
    per_doc = totals.means().reshape(-1, len(cells), len(MEASURES))
    for c, (_, mask, _) in enumerate(plans):
        if not mask:  # the family is every source wherever it appears: nothing to mask
            per_doc[:, c, 1:3] = np.nan
    return per_doc, stds
