"""Plots drawn from result documents alone: nothing here recomputes a statistic."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nnobs.atomic import atomic_path  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def layer_profile(doc: dict, path: str | Path) -> Path:
    """pcorr per layer (sweep), the multi-seed candidates with their spread, the floor."""
    fig, ax = plt.subplots(figsize=(7, 4))
    layers = [r["layer"] for r in doc["sweep"]]
    ax.plot(layers, [r["pcorr"] for r in doc["sweep"]], "o-", label="pcorr (validation, seed 42)")
    ax.plot(
        layers,
        [r["spearman"] for r in doc["sweep"]],
        ".--",
        color="grey",
        label="uncontrolled Spearman",
    )
    multi = doc["multiseed"]
    ax.errorbar(
        [r["layer"] for r in multi],
        [r["mean"] for r in multi],
        yerr=[r["std"] for r in multi],
        fmt="s",
        capsize=4,
        color="C1",
        label=f"{len(multi[0]['seeds'])}-seed mean ± std",
    )
    head = doc["headline"]
    lo, hi = head["ensemble_ci95"]
    ax.errorbar(
        [doc["layer"]],
        [head["ensemble"]],
        yerr=[[head["ensemble"] - lo], [hi - head["ensemble"]]],
        fmt="*",
        markersize=12,
        capsize=4,
        color="C3",
        label="test (ensemble, 95% CI)",
    )
    ax.axhspan(
        -doc["floor"]["value"],
        doc["floor"]["value"],
        color="grey",
        alpha=0.15,
        label="detection floor",
    )
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("partial Spearman with loss")
    ax.set_xticks(layers)
    name = doc["provenance"].get("path") or doc["provenance"].get("architecture", "")
    ax.set_title(f"Decision-quality signal by layer — {Path(str(name)).name}")
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)
