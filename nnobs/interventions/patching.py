"""Activation patching: copy activations from a source run into a base run, one component
and position at a time, and measure how much of the clean behaviour comes back.

With ``source="clean"`` (the default) the base run is the corrupted prompt and clean
activations are patched in; with ``source="corrupted"`` the reverse. Either way the metric
is the logit difference ``logit[correct] - logit[incorrect]`` at the last position, and the
normalised effect is ``(patched - corrupted) / (clean - corrupted)`` of its mean over items:
patching clean activations that carry the whole answer gives 1, irrelevant ones give 0 (and
in the reverse direction an unpatched clean run is 1, a decisive patch pulls it to 0).

A sweep runs batched: each row of a forward pass is one corrupted prompt with one
different patch applied (its own unit and position), so a layers × positions sweep over
a whole task costs a handful of forward passes rather than one per patch.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from nnobs.core.errors import NnobsError
from nnobs.data.tasks import EncodedTask
from nnobs.interventions.targets import (
    make_target,
    position_axis,
    replace_edit,
    result_document,
    site_shape,
)
from nnobs.models.adapter import ModelAdapter

SOURCES = ("clean", "corrupted")
# Sweeps by name: a site kind per layer, or every head of every layer.
SWEEPS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_hidden", "heads")


@dataclass(frozen=True)
class PatchSettings:
    """Every choice a patching sweep makes besides what it patches; stored in the result.

    ``source``: the run activations come from (``clean`` patches into the corrupted run);
    ``per_position``: each unit at each position, else at all positions at once;
    ``batch_size``: rows per forward pass; ``n_boot``, ``seed``: the bootstrap of the gap.
    """

    source: str = "clean"
    per_position: bool = True
    batch_size: int = 64
    n_boot: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        _check_source(self.source)
        if self.batch_size < 1:
            raise NnobsError(f"batch_size must be a positive integer, got {self.batch_size}")


@dataclass(frozen=True)
class Unit:
    """One component to patch: a whole site, or one head of a ``head_out`` site."""

    site: str
    head: int | None = None

    @property
    def label(self) -> str:
        return self.site if self.head is None else f"{self.site}[{self.head}]"


def sweep_units(adapter: ModelAdapter, sweep: str) -> list[Unit]:
    """The units of a named sweep: ``blocks.{l}.<kind>`` for every layer, or ``heads``
    (every head of every layer's ``head_out``)."""
    if sweep not in SWEEPS:
        raise NnobsError(f"unknown sweep {sweep!r}: choose one of {', '.join(SWEEPS)}")
    if sweep != "heads":
        return [Unit(adapter.site_name(layer, sweep)) for layer in range(adapter.n_layers)]
    units = []
    for layer in range(adapter.n_layers):
        site = adapter.site_name(layer, "head_out")
        units.extend(Unit(site, h) for h in range(site_shape(adapter, site)[2]))
    return units


def check_units(adapter: ModelAdapter, units: Sequence[Unit]) -> None:
    """Every unit names an existing site that has positions on axis 1, and a head in range."""
    if not units:
        raise NnobsError("nothing to patch: give at least one site")
    for unit in units:
        if position_axis(unit.site) != 1:
            raise NnobsError(f"{unit.site!r} cannot be patched by position: patch head_out instead")
        heads = None if unit.head is None else [unit.head]
        make_target(adapter, unit.site, heads=heads)


def position_map(base_len: int, source_len: int, align: str | None) -> torch.Tensor:
    """For each base position the source position it is patched from, or -1 for none."""
    base = torch.arange(base_len)
    if base_len == source_len or align == "left":
        src = base
    elif align == "right":
        src = base - base_len + source_len
    else:
        raise NnobsError(
            f"prompts of {base_len} and {source_len} tokens cannot be patched position by "
            "position: make them equal or choose an alignment (left or right)"
        )
    return torch.where((src >= 0) & (src < source_len), src, torch.full_like(src, -1))


def _ids(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    return torch.tensor(list(rows), dtype=torch.long, device=device)


def _logit_diff(logits: torch.Tensor, correct: torch.Tensor, incorrect: torch.Tensor):
    last = logits[:, -1].float()
    rows = torch.arange(len(last), device=last.device)
    return last[rows, correct] - last[rows, incorrect]


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise NnobsError(f"unknown patch source {source!r}: use one of {', '.join(SOURCES)}")


def _roles(task: EncodedTask, source: str) -> tuple[list[list[int]], list[list[int]]]:
    """(base prompts, source prompts): the run patched into, and the run patched from."""
    _check_source(source)
    if source == "clean":
        return task.corrupted, task.clean
    return task.clean, task.corrupted


def logit_diffs(adapter: ModelAdapter, task: EncodedTask, which: str) -> np.ndarray:
    """The unpatched logit difference of every item's ``clean`` or ``corrupted`` prompt."""
    prompts = task.clean if which == "clean" else task.corrupted
    out = np.empty(len(task))
    dev = adapter.device
    correct, incorrect = _ids([task.correct], dev)[0], _ids([task.incorrect], dev)[0]
    for group in task.groups():
        logits, _ = adapter.run_with_cache(_ids([prompts[i] for i in group], dev), [])
        out[group] = _logit_diff(logits, correct[group], incorrect[group]).cpu().numpy()
    return out


def patched_run(
    adapter: ModelAdapter,
    task: EncodedTask,
    item: int,
    patches: Sequence[tuple[Unit, int | None]],
    source: str = "clean",
) -> torch.Tensor:
    """Logits (pos, vocab) of one item's base prompt with every ``(unit, position)`` in
    ``patches`` patched at once from its source prompt (position ``None``: all positions).

    The plain reference implementation, one forward pass per call: patching every site
    reproduces the source run, patching nothing the base run.
    """
    base, src = _roles(task, source)
    dev = adapter.device
    base_ids, src_ids = _ids([base[item]], dev), _ids([src[item]], dev)
    pmap = position_map(len(base[item]), len(src[item]), task.align).to(dev)
    valid = (pmap >= 0).nonzero().flatten().tolist()
    sites = list(dict.fromkeys(unit.site for unit, _ in patches))
    _, cache = adapter.run_with_cache(src_ids, sites)
    edits: dict = {}
    for unit, pos in patches:
        if pos is not None and not -len(pmap) <= pos < len(pmap):
            raise NnobsError(f"position {pos} is out of range for a prompt of {len(pmap)} tokens")
        if pos is not None and pmap[pos] < 0:
            continue  # no source position to patch from
        aligned = cache[unit.site][:, pmap.clamp(min=0)]
        positions = valid if pos is None else [pos]
        heads = None if unit.head is None else (unit.head,)
        target = make_target(adapter, unit.site, positions=positions, heads=heads)
        edits.setdefault(unit.site, []).append(replace_edit(target, aligned))
    logits, _ = adapter.run_with_cache(base_ids, [], edits=edits)
    return logits[0]


@dataclass
class PatchArrays:
    """Per-item logit differences of a sweep: ``patched`` is (items, units, positions)."""

    units: list[Unit]
    # Absolute positions, or end-aligned offsets (-m..-1) when prompt lengths vary, and the
    # first item's tokens there ("clean/corrupted" where the two differ).
    positions: list[int]
    position_labels: list[str]
    per_position: bool
    clean: np.ndarray
    corrupted: np.ndarray
    patched: np.ndarray


def _positions(task: EncodedTask, base: list[list[int]]) -> tuple[list[int], list[str]]:
    """The swept positions (end-aligned when base prompts differ in length) and labels."""
    lengths = {len(b) for b in base}
    m = min(lengths)
    offsets = list(range(-m, 0)) if len(lengths) > 1 else list(range(m))
    clean, corrupted = task.token_strs[0][-m:], task.corrupted_strs[0][-m:]
    if len(task.clean[0]) != len(task.corrupted[0]):  # aligned prompts: the base run's tokens
        return offsets, corrupted if base is task.corrupted else clean
    return offsets, [c if c == k else f"{c}/{k}" for c, k in zip(clean, corrupted, strict=True)]


def patch_sweep_arrays(
    adapter: ModelAdapter,
    task: EncodedTask,
    units: Sequence[Unit],
    settings: PatchSettings | None = None,
    *,
    progress: bool = False,
) -> PatchArrays:
    """Patch every unit, at every position (or at all positions at once), into every item.

    Each forward pass stacks ``settings.batch_size`` rows; row r is item i_r's base prompt with unit
    u_r patched at position p_r, so one pass serves many patches. Positions are aligned at
    the end when items differ in length: the sweep covers the last ``m`` positions, ``m``
    the shortest base prompt. A patch whose base position has no source position
    (``align`` with unequal lengths) is left out (NaN).
    """
    settings = settings or PatchSettings()
    per_position, batch_size = settings.per_position, settings.batch_size
    check_units(adapter, units)
    units = list(units)
    base, src = _roles(task, settings.source)
    offsets, labels = _positions(task, base)
    n_pos = len(offsets) if per_position else 1
    patched = np.full((len(task), len(units), n_pos), np.nan)
    dev = adapter.device
    correct, incorrect = _ids([task.correct], dev)[0], _ids([task.incorrect], dev)[0]
    sites = list(dict.fromkeys(u.site for u in units))
    unit_site = torch.tensor([sites.index(u.site) for u in units], device=dev)
    unit_head = torch.tensor([-1 if u.head is None else u.head for u in units], device=dev)
    # Every row of the sweep: (item within its group, unit, position index).
    grid = torch.cartesian_prod(torch.arange(len(units)), torch.arange(n_pos)).to(dev)
    groups = task.groups()
    total = sum(-(-len(g) * len(grid) // batch_size) for g in groups)
    bar = tqdm(total=total, desc="patching", unit="batch", disable=not progress)
    for group in groups:
        base_ids = _ids([base[i] for i in group], dev)
        t_base = base_ids.shape[1]
        pmap = position_map(t_base, len(src[group[0]]), task.align).to(dev)
        _, cache = adapter.run_with_cache(_ids([src[i] for i in group], dev), sites)
        aligned = [cache[s][:, pmap.clamp(min=0)] for s in sites]  # source at base positions
        # Base position of each position index; -1 patches all positions at once.
        where = torch.tensor([t_base + o if o < 0 else o for o in offsets], device=dev)
        where = where if per_position else torch.full((1,), -1, device=dev)
        items = torch.arange(len(group), device=dev).repeat_interleave(len(grid))
        rows_all = torch.cat([items[:, None], grid.repeat(len(group), 1)], 1)
        for start in range(0, len(rows_all), batch_size):
            item, unit, j = rows_all[start : start + batch_size].unbind(1)
            pos = where[j]
            span = torch.arange(t_base, device=dev)
            pos_mask = ((pos[:, None] == span) | (pos[:, None] < 0)) & (pmap >= 0)
            edits = {}
            for k, site in enumerate(sites):
                sel = (unit_site[unit] == k).nonzero().flatten()
                if len(sel):
                    edits[site] = _row_patch(
                        aligned[k], sel, item[sel], pos_mask[sel], unit_head[unit[sel]]
                    )
            logits, _ = adapter.run_with_cache(base_ids[item], [], edits=edits)
            g = torch.tensor(group, device=dev)[item]
            ld = _logit_diff(logits, correct[g], incorrect[g])
            ld = torch.where(pos_mask.any(1), ld, torch.nan)
            patched[g.cpu().numpy(), unit.cpu().numpy(), j.cpu().numpy()] = ld.cpu().numpy()
            bar.update()
    bar.close()
    return PatchArrays(
        units=units,
        positions=offsets if per_position else [],
        position_labels=labels if per_position else [],
        per_position=per_position,
        clean=logit_diffs(adapter, task, "clean"),
        corrupted=logit_diffs(adapter, task, "corrupted"),
        patched=patched,
    )


def _row_patch(source, rows, items, pos_mask, heads):
    """An edit replacing, in batch rows ``rows``, the masked positions (and the head, where
    ``heads >= 0``) with the source activations of ``items``."""

    def edit(x: torch.Tensor) -> torch.Tensor:
        mask = pos_mask.view(*pos_mask.shape, *[1] * (x.dim() - 2))
        if x.dim() == 4:  # head_out, (batch, pos, heads, d_head): narrow to one head
            span = torch.arange(x.shape[2], device=x.device)
            head_sel = (heads[:, None] == span) | (heads[:, None] < 0)
            mask = mask & head_sel[:, None, :, None]
        out = x.clone()
        out[rows] = torch.where(mask, source[items].to(x.dtype), x[rows])
        return out

    return edit


def _effects(arrays: PatchArrays) -> tuple[np.ndarray, np.ndarray]:
    """Mean patched logit difference per (unit, position) and its normalised effect."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a cell no item could patch stays NaN
        patched = np.nanmean(arrays.patched, axis=0)
    gap = float(arrays.clean.mean() - arrays.corrupted.mean())
    effect = (
        (patched - arrays.corrupted.mean()) / gap if gap != 0 else np.full_like(patched, np.nan)
    )
    return patched, effect


def patch_sweep(
    adapter: ModelAdapter,
    task: EncodedTask,
    sweeps: Sequence[str] = ("resid_pre",),
    settings: PatchSettings | None = None,
    *,
    progress: bool = False,
) -> dict:
    """Run each named sweep (see ``SWEEPS``) over ``task`` and return a result document:
    per sweep a units × positions grid of mean patched logit differences and normalised
    effects, plus the clean and corrupted baselines with a bootstrap interval of their gap."""
    from nnobs.measure import stats

    settings = settings or PatchSettings()
    if not sweeps:
        raise NnobsError(f"no sweep given: choose from {', '.join(SWEEPS)}")
    swept, arrays = [], None
    for name in sweeps:
        arrays = patch_sweep_arrays(
            adapter, task, sweep_units(adapter, name), settings, progress=progress
        )
        patched, effect = _effects(arrays)
        swept.append(
            {
                "name": name,
                "units": [u.label for u in arrays.units],
                "per_position": settings.per_position,
                "positions": arrays.positions,
                "position_labels": arrays.position_labels,
                "patched_logit_diff": patched,
                "effect": effect,
            }
        )
    clean, corrupted = arrays.clean, arrays.corrupted
    gap_ci = (
        stats.bootstrap_ci(
            lambda a, b: a.mean() - b.mean(),
            clean,
            corrupted,
            n_boot=settings.n_boot,
            seed=settings.seed,
        )
        if len(clean) > 1
        else (float("nan"), float("nan"))
    )
    return result_document(
        adapter,
        "patching",
        asdict(settings),
        task=task.describe(),
        baseline={
            "clean_logit_diff": float(clean.mean()),
            "corrupted_logit_diff": float(corrupted.mean()),
            "gap": float(clean.mean() - corrupted.mean()),
            "gap_ci95": list(gap_ci),
            "clean_accuracy": float((clean > 0).mean()),
            "corrupted_accuracy": float((corrupted < 0).mean()),
        },
        sweeps=swept,
    )
