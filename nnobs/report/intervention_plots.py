"""Plots of intervention results, drawn from the result documents alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nnobs.report.plots import plt, save_figure


def _label(token: str) -> str:
    """A token as a tick label: spaces shown as ␣, newlines and control characters escaped."""
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in token)
    return shown.replace(" ", "\u2423")


def _grid(rows: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)


def patching_heatmap(result: dict, sweep: dict, path: str | Path) -> Path:
    """Normalised patching effect of one sweep: units (rows) × positions (columns)."""
    effect = _grid(sweep["effect"])
    labels = [_label(t) for t in sweep["position_labels"]] or ["all positions"]
    width = max(4.0, 0.45 * effect.shape[1] + 2.5)
    height = max(2.5, 0.28 * effect.shape[0] + 1.5)
    fig, ax = plt.subplots(figsize=(width, height))
    limit = max(1.0, float(np.nanmax(np.abs(effect))) if np.isfinite(effect).any() else 1.0)
    image = ax.imshow(effect, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(effect.shape[1]), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(effect.shape[0]), sweep["units"], fontsize=7)
    ax.set_xlabel("position (token of the first clean prompt)")
    fig.colorbar(image, ax=ax, label="(patched - corrupted) / (clean - corrupted)")
    source = result["settings"]["source"]
    base = result["baseline"]
    ax.set_title(
        f"{result['task']['name']}: {sweep['name']} patched from the {source} run\n"
        f"({result['task']['n_items']} items; mean logit difference clean "
        f"{base['clean_logit_diff']:.2f}, "
        f"corrupted {base['corrupted_logit_diff']:.2f})",
        fontsize=9,
    )
    return save_figure(fig, path)


def attribution_plot(result: dict, path: str | Path, max_items: int = 6) -> Path:
    """Attribution per token for the first ``max_items`` items, one panel each."""
    items = result["items"][:max_items]
    fig, axes = plt.subplots(len(items), 1, figsize=(9, 1.9 * len(items)), squeeze=False)
    for ax, item in zip(axes[:, 0], items, strict=True):
        values = np.asarray(item["per_position"], dtype=float)
        colors = np.where(values >= 0, "C3", "C0")
        ax.bar(range(len(values)), values, color=colors)
        ax.axhline(0, color="grey", linewidth=0.5)
        labels = [_label(t) for t in item["tokens"]]
        ax.set_xticks(range(len(values)), labels, fontsize=8)
        error = item["rel_error"]
        gap = f"{error:.2%}" if error is not None else "n/a"
        ax.set_title(
            f"item {item['item']}: f = {item['f_input']:.3f}, baseline {item['f_baseline']:.3f}, "
            f"sum {item['attribution_sum']:.3f} (gap {gap}, {item['steps']} steps)",
            fontsize=8,
        )
    s = result["settings"]
    fig.suptitle(
        f"{result['task']['name']}: {s['method']} to {s['site']} ({s['baseline']} baseline)",
        fontsize=10,
    )
    fig.tight_layout()
    return save_figure(fig, path)
