"""Edits carried from a sparse model into a dense one through a bridge (Gao et al. 2025).

A channel of the sparse model's residual read (a sublayer's input after its norm,
``blocks.{l}.attn_in`` or ``blocks.{l}.mlp_in``: a node of a pruned circuit) is edited as it
would change on the counterfactual prompt: per token, Δ = (its value on the counterfactual
prompt) − (its value on the presented prompt). The dense model gets, at the same read, ``α · Δ
· u`` for every token, with ``u`` the bridge decoder's column for that channel carried into the
dense model's normalised coordinates: the decoder maps the sparse stream before the norm to the
dense stream before the norm, a normalised channel is its stream value × gain / stream RMS, so
``u = W_dec[:, c] ⊙ g_dense / g_sparse[c] × RMS_sparse / RMS_dense`` (RMS: the mean residual
RMS at that site over reference windows; gains: the norms' weights, 1 where a norm has none).

What it measures: the dense model's probability of the counterfactual answer (against the
presented one: ``σ(l_counterfactual − l_presented)`` at the last position) as α goes from 0 to 1,
against control edits of the same size (the same Δ along other channels' directions rescaled to
``u``'s norm). The stated test, at α = 1: per prompt, d = p(edit) − mean p(controls); one-sided
sign-flip permutation test of mean d > 0 at ``level`` (null: the edit moves the answer no more
than a random channel of the same size). Items whose two prompts differ in token length are left
out (Δ is per token) and counted, unless they are lined up at their last token
(``align_right``: the shorter prompt's tokens pair the longer one's last tokens).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from nnobs.circuits.bridge_model import Bridges
from nnobs.circuits.nodes import circuit_adapter
from nnobs.core.errors import NnobsError
from nnobs.data.tasks import EncodedTask
from nnobs.measure.stats import percentile_interval
from nnobs.models.adapter import ModelAdapter

READ_TO_BRIDGE = {"attn_in": "resid_pre", "mlp_in": "resid_mid"}
DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def parse_channel(text: str, n_layers: int, width: int) -> tuple[str, int]:
    """``"blocks.2.attn_in:17"`` → (site, channel); refused in one line when the site is not a
    residual read of the model or the index is out of range."""
    match = re.fullmatch(r"(blocks\.(\d+)\.(attn_in|mlp_in)):(-?\d+)", text.strip())
    if not match:
        raise NnobsError(
            f"channel {text!r} is not SITE:INDEX with SITE blocks.<layer>.attn_in or "
            "blocks.<layer>.mlp_in (a residual read after the norm), e.g. blocks.1.attn_in:17"
        )
    site, layer, index = match.group(1), int(match.group(2)), int(match.group(4))
    if layer >= n_layers:
        raise NnobsError(f"channel {text!r}: layer {layer} is out of range 0..{n_layers - 1}")
    if not 0 <= index < width:
        raise NnobsError(f"channel {text!r}: index {index} is out of range 0..{width - 1}")
    return site, index


def bridge_site(read_site: str) -> str:
    """The bridge site (stream before the norm) of a residual read (after it)."""
    prefix, kind = read_site.rsplit(".", 1)
    return f"{prefix}.{READ_TO_BRIDGE[kind]}"


@dataclass
class EditItems:
    """The task items an edit is measured on: presented prompts, per-token Δ at the channel,
    and the presented and counterfactual answers."""

    ids: list[list[int]]
    deltas: list[np.ndarray]
    presented: list[int]
    counterfactual: list[int]
    n_left_out: int


def aligned_items(task: EncodedTask, align_right: bool = False) -> list[int]:
    """The items Δ is taken on: those whose presented and counterfactual prompts have the same
    token length, or every item with ``align_right`` (prompts lined up at their last token)."""
    if align_right:
        return list(range(len(task)))
    keep = [i for i in range(len(task)) if len(task.clean[i]) == len(task.corrupted[i])]
    if not keep:
        raise NnobsError(
            f"task {task.name!r} has no item whose two prompts have the same token length: "
            "Δ per token needs them aligned (line them up at their last token with --align right)"
        )
    return keep


def read_deltas(
    sparse: ModelAdapter, task: EncodedTask, sites: list[str], align_right: bool = False
) -> dict[str, list[np.ndarray]]:
    """Per read site, Δ = counterfactual − presented (presented positions × channels) for each
    item of :func:`aligned_items`, in order; one forward pass per pair of prompt lengths and
    prompt. Right-aligned prompts of different lengths pair their last ``m`` tokens (``m`` the
    shorter length); the presented prompt's earlier positions get Δ = 0."""
    sparse = circuit_adapter(sparse)
    keep = aligned_items(task, align_right)
    out: dict[str, list] = {site: [None] * len(keep) for site in sites}
    by_len: dict[tuple[int, int], list[int]] = {}
    for row, i in enumerate(keep):
        by_len.setdefault((len(task.clean[i]), len(task.corrupted[i])), []).append(row)
    for (n_clean, n_cf), rows in by_len.items():
        m = min(n_clean, n_cf)
        values = []
        for prompts in (task.clean, task.corrupted):
            ids = torch.tensor([prompts[keep[r]] for r in rows], device=sparse.device)
            values.append(sparse.run_with_cache(ids, sites)[1])
        for site in sites:
            clean, cf = values[0][site].double().cpu().numpy(), values[1][site].double().cpu()
            delta = np.zeros_like(clean)
            delta[:, n_clean - m :] = cf.numpy()[:, n_cf - m :] - clean[:, n_clean - m :]
            for j, row in enumerate(rows):
                out[site][row] = delta[j]
    return out


def edit_items(
    sparse: ModelAdapter, task: EncodedTask, site: str, channel: int, align_right: bool = False
) -> EditItems:
    """Δ per token at ``site``:``channel`` of the sparse model for the items of
    :func:`aligned_items`."""
    keep = aligned_items(task, align_right)
    deltas = read_deltas(sparse, task, [site], align_right)[site]
    return EditItems(
        ids=[task.clean[i] for i in keep],
        deltas=[d[:, channel] for d in deltas],
        presented=[task.correct[i] for i in keep],
        counterfactual=[task.incorrect[i] for i in keep],
        n_left_out=len(task) - len(keep),
    )


def mean_abs_delta(deltas: list[np.ndarray]) -> np.ndarray | float:
    """Mean |Δ| over every token of every item (per channel, for positions × channels)."""
    return np.abs(np.concatenate(deltas)).mean(0)


def _norm_gain(model, layer: int, kind: str, width: int) -> torch.Tensor:
    norm = getattr(model.blocks[layer], "norm1" if kind == "attn_in" else "norm2", None)
    weight = getattr(norm, "weight", None)
    return torch.ones(width) if weight is None else weight.detach().float().cpu()


def stream_rms(adapter: ModelAdapter, site: str, reference: torch.Tensor) -> float:
    """Mean over reference tokens of the residual stream's RMS at ``site``."""
    _, cache = adapter.run_with_cache(reference.to(adapter.device), [site])
    return float(cache[site].float().pow(2).mean(-1).sqrt().mean())


def edit_direction(
    bridges: Bridges,
    dense: ModelAdapter,
    sparse: ModelAdapter,
    read_site: str,
    channel: int,
    rms_ratio: float,
) -> torch.Tensor:
    """``u``: the dense-model read direction one unit of the sparse read channel becomes."""
    layer, kind = int(read_site.split(".")[1]), read_site.rsplit(".", 1)[-1]
    column = bridges.decoder_column(bridge_site(read_site), channel).float().cpu()
    g_dense = _norm_gain(dense.model, layer, kind, dense.d_model)
    g_sparse = _norm_gain(sparse.model, layer, kind, sparse.d_model)[channel]
    if float(g_sparse) == 0.0:
        raise NnobsError(f"channel {read_site}:{channel} has norm gain 0: it never carries Δ")
    return column * g_dense / g_sparse * rms_ratio


def counterfactual_probs(
    dense: ModelAdapter, items: EditItems, read_site: str, directions: torch.Tensor, alpha: float
) -> np.ndarray:
    """(directions, items): the dense model's probability of the counterfactual answer against
    the presented one when ``α · Δ · direction`` is added at ``read_site`` for every token."""
    dense = circuit_adapter(dense)
    out = np.zeros((len(directions), len(items.ids)))
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(items.ids):
        by_len.setdefault(len(ids), []).append(i)
    for rows in by_len.values():
        ids = torch.tensor([items.ids[i] for i in rows], device=dense.device)
        delta = torch.tensor(np.stack([items.deltas[i] for i in rows]), dtype=torch.float32)
        delta = delta.to(dense.device).unsqueeze(-1)
        cf = torch.tensor([items.counterfactual[i] for i in rows], device=dense.device)
        pr = torch.tensor([items.presented[i] for i in rows], device=dense.device)
        pos = torch.arange(len(rows), device=dense.device)
        for d, direction in enumerate(directions.to(dense.device)):
            edit = {read_site: lambda x, u=direction, dt=delta: x + alpha * dt * u}
            logits, _ = dense.run_with_cache(ids, [], edits=edit)
            last = logits[:, -1].float()
            out[d, rows] = torch.sigmoid(last[pos, cf] - last[pos, pr]).cpu().numpy()
    return out


def sign_flip_test(diffs: np.ndarray, n_perm: int = 10000, seed: int = 0) -> float:
    """One-sided p-value of mean(diffs) > 0 by random sign flips (exact under a null
    symmetric about zero; the observed signs count as one of the flips)."""
    diffs = np.asarray(diffs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=(n_perm, len(diffs)))
    flipped = (signs * diffs).mean(1)
    return float((1 + np.sum(flipped >= diffs.mean() - 1e-15)) / (n_perm + 1))


def mean_with_interval(values: np.ndarray, n_boot: int, seed: int) -> dict:
    """The mean over items and its 95% percentile bootstrap interval over items."""
    values = np.asarray(values, dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(values), (n_boot, len(values)))
    return {
        "value": float(values.mean()),
        "ci95": list(percentile_interval(values[draws].mean(1))),
    }


def edit_test(
    p_edit: np.ndarray,
    p_control: np.ndarray,
    level: float = 0.05,
    n_perm: int = 10000,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """The stated test at one strength: d = p_edit − mean over controls of p_control (per
    item; ``p_control`` is (controls, items)), its mean with an interval over items, the
    sign-flip p-value and the verdict (``transfers`` when p < level, else ``no_transfer``)."""
    diffs = np.asarray(p_edit) - np.asarray(p_control).mean(0)
    p = sign_flip_test(diffs, n_perm, seed)
    return {
        "effect": mean_with_interval(diffs, n_boot, seed),
        "p_value": p,
        "level": level,
        "n_perm": n_perm,
        "n_items": int(len(diffs)),
        "verdict": "transfers" if p < level else "no_transfer",
    }


def control_channels(width: int, chosen: int, n: int, seed: int) -> list[int]:
    """``n`` distinct random channels other than ``chosen`` (fewer if the width has fewer)."""
    others = np.array([c for c in range(width) if c != chosen])
    rng = np.random.default_rng(seed)
    return sorted(int(c) for c in rng.choice(others, size=min(n, len(others)), replace=False))
