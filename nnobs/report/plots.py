"""Plots drawn from result documents alone: nothing here recomputes a statistic."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from nnobs.core.files import atomic_path


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (atomically) and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def layer_profile(result: dict, path: str | Path) -> Path:
    """pcorr per layer (sweep), the multi-seed candidates with their spread, the test headline
    with its interval, and the random-init null with the floor at the reported layer."""
    fig, ax = plt.subplots(figsize=(7, 4))
    layers = [r["layer"] for r in result["sweep"]]
    ax.plot(
        layers, [r["pcorr"] for r in result["sweep"]], "o-", label="pcorr (validation, seed 42)"
    )
    ax.plot(
        layers,
        [r["spearman"] for r in result["sweep"]],
        ".--",
        color="grey",
        label="uncontrolled Spearman",
    )
    multi = result["multiseed"]
    ax.errorbar(
        [r["layer"] for r in multi],
        [r["mean"] for r in multi],
        yerr=[r["std"] for r in multi],
        fmt="s",
        capsize=4,
        color="C1",
        label=f"{len(multi[0]['seeds'])}-seed mean ± std",
    )
    head = result["headline"]
    lo, hi = head["ensemble_ci95"]
    ax.errorbar(
        [result["layer"]],
        [head["ensemble"]],
        # a percentile interval from few tokens need not contain the estimate
        yerr=[[max(0.0, head["ensemble"] - lo)], [max(0.0, hi - head["ensemble"])]],
        fmt="*",
        markersize=12,
        capsize=4,
        color="C3",
        label="test (ensemble, 95% CI)",
    )
    null = result.get("null")
    if null is not None:  # the verdict's floor, measured at the reported layer
        ax.errorbar(
            [result["layer"] + 0.15],
            [null["null_mean"]],
            yerr=[[0.0], [null["floor"] - null["null_mean"]]],
            fmt="x",
            capsize=4,
            color="grey",
            label=f"random-init null → floor (level {null['level']:g})",
        )
    elif "floor" in result:  # results from before the calibrated null
        value = result["floor"]["value"]
        ax.axhspan(-value, value, color="grey", alpha=0.15, label="detection floor")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("partial Spearman with loss")
    ax.set_xticks(layers)
    name = result["provenance"].get("path") or result["provenance"].get("architecture", "")
    ax.set_title(f"Decision-quality signal by layer — {Path(str(name)).name}")
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)


# ------------------------------------------------------------ trajectories and studies
# A trajectory document (nnobs.trajectory) holds one run; a study document (nnobs.study)
# holds per-variant means over training seeds in each variant's "aggregate". Steps are
# log-spaced early and linear late, so curves use a symlog step axis and heatmaps one
# column per checkpoint.


def _nan(values) -> list:
    return [float("nan") if v is None else v for v in values]


def _step_axis(ax, steps: list[int]) -> None:
    """Symlog steps, ticked at the checkpoints (at most ~10 labels)."""
    from matplotlib.ticker import NullLocator

    positive = sorted(s for s in set(steps) if s > 0)
    if positive:
        ax.set_xscale("symlog", linthresh=positive[0], linscale=0.5)
    ticks = sorted(set(steps))[:: max(1, len(set(steps)) // 10)]
    ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=8, rotation=45)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("training step")


def _heatmap(ax, steps, layers, matrix, label: str, cmap: str, vmin=None, vmax=None, marks=None):
    """Layers (rows) × checkpoints (columns); ``matrix`` is [step][layer], None for missing."""
    import numpy as np

    data = np.array([_nan(row) if row else [np.nan] * len(layers) for row in matrix], float).T
    image = ax.imshow(data, aspect="auto", origin="lower", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(steps)), [str(s) for s in steps], rotation=45, fontsize=8)
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel("layer")
    if len(steps) * len(layers) <= 120:  # numbers in the cells while they stay legible
        for j in range(data.shape[1]):
            for i in range(data.shape[0]):
                if np.isfinite(data[i, j]):
                    ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=6)
    for j, i in marks or []:
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=1.5, ec="black"))
    ax.figure.colorbar(image, ax=ax, label=label)


def _measured(traj: dict) -> list[dict]:
    return [r for r in traj["checkpoints"] if r["status"] in ("observed", "shrunk")]


def _pcorr_limits(values) -> tuple[float, float]:
    finite = [v for v in values if v is not None]
    top = max([abs(v) for v in finite] + [0.05])
    return -top, top


def pcorr_heatmap(
    steps: list[int],
    layers: list[int],
    matrix: list,
    path: str | Path,
    title: str,
    best_layers: list | None = None,
) -> Path:
    """pcorr per layer × checkpoint; outlined cells are each checkpoint's reported layer."""
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(steps) + 2), max(3, 0.45 * len(layers) + 1.5)))
    flat = [v for row in matrix if row for v in row]
    lo, hi = _pcorr_limits(flat)
    marks = [
        (j, layers.index(b))
        for j, b in enumerate(best_layers or [])
        if b is not None and b in layers
    ]
    _heatmap(ax, steps, layers, matrix, "pcorr (validation)", "RdBu_r", lo, hi, marks)
    ax.set_title(title)
    return save_figure(fig, path)


def trajectory_heatmap(traj: dict, path: str | Path) -> Path:
    rows = {r["step"]: r for r in _measured(traj)}
    steps = [r["step"] for r in traj["checkpoints"]]
    layers = [x["layer"] for x in next(iter(rows.values()))["layers"]]
    matrix = [[x["pcorr"] for x in rows[s]["layers"]] if s in rows else None for s in steps]
    best = [rows[s]["best"]["layer"] if s in rows else None for s in steps]
    return pcorr_heatmap(steps, layers, matrix, path, "pcorr by layer over training", best)


def signal_and_loss(
    steps: list[int],
    pcorr: list,
    ci95: list,
    path: str | Path,
    title: str,
    *,
    oc: list | None = None,
    random_head: list | None = None,
    floor: float | None = None,
    loss_steps: list[int] | None = None,
    train_loss: list | None = None,
    val_steps: list[int] | None = None,
    val_loss: list | None = None,
    collapse_step: int | None = None,
    ci_label: str = "95% CI",
) -> Path:
    """The best layer's pcorr (with its interval) over training, next to the loss curves."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    lo = [c[0] if c else float("nan") for c in ci95]
    hi = [c[1] if c else float("nan") for c in ci95]
    top.fill_between(steps, lo, hi, color="C0", alpha=0.2, label=ci_label)
    top.plot(steps, _nan(pcorr), "o-", color="C0", label="pcorr at the best layer (test)")
    if oc is not None:
        top.plot(steps, _nan(oc), "s--", color="C2", ms=4, label="output-controlled")
    if random_head is not None:
        top.plot(steps, _nan(random_head), ":", color="grey", label="random heads |pcorr| q95")
    if floor is not None:
        top.axhline(floor, color="C3", lw=1, ls="--", label=f"detection floor {floor:.3f}")
    if collapse_step is not None:
        for ax in (top, bottom):
            ax.axvline(collapse_step, color="C3", lw=2, alpha=0.5)
        top.annotate("collapse", (collapse_step, floor or 0), color="C3", fontsize=8)
    top.axhline(0, color="black", lw=0.5)
    top.set_ylabel("partial Spearman with loss")
    top.set_title(title)
    top.legend(fontsize=8, loc="best")
    if train_loss is not None:
        bottom.plot(loss_steps, _nan(train_loss), color="C1", alpha=0.6, label="train loss")
    if val_loss is not None:
        bottom.plot(val_steps, _nan(val_loss), "o-", color="C4", ms=4, label="validation loss")
    bottom.set_ylabel("loss (nats/token)")
    bottom.legend(fontsize=8, loc="best")
    _step_axis(bottom, steps)
    return save_figure(fig, path)


def trajectory_signal(traj: dict, path: str | Path) -> Path:
    rows = _measured(traj)
    curve = traj["loss_curve"]
    floor = (traj.get("floor") or {}).get("value")
    collapse = traj.get("collapse") or {}
    vals = [r for r in curve if r.get("val_loss") is not None]
    return signal_and_loss(
        [r["step"] for r in rows],
        [r["best"]["ensemble"] for r in rows],
        [r["best"]["ensemble_ci95"] for r in rows],
        path,
        f"Signal and loss over training — verdict: {collapse.get('verdict', 'n/a')}",
        oc=[r["output_controlled"]["ensemble"] for r in rows],
        random_head=[r["random_head"]["abs_q95"] for r in rows],
        floor=floor,
        loss_steps=[r["step"] for r in curve],
        train_loss=[r.get("loss") for r in curve],
        val_steps=[r["step"] for r in vals],
        val_loss=[r["val_loss"] for r in vals],
        collapse_step=collapse.get("collapse_step"),
        ci_label="95% CI (documents bootstrap)",
    )


def cka_over_training(
    steps: list[int], layers: list[int], matrix: list, path: str | Path, title: str
) -> Path:
    """Linear CKA of each layer to the same layer at the last checkpoint."""
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(steps) + 2), max(3, 0.45 * len(layers) + 1.5)))
    _heatmap(ax, steps, layers, matrix, "linear CKA to the final checkpoint", "viridis", 0, 1)
    ax.set_title(title)
    return save_figure(fig, path)


def cka_layers(cka: dict, path: str | Path, title: str) -> Path:
    """Layer × layer linear CKA at one checkpoint."""
    import numpy as np

    layers = cka["layers"]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    image = ax.imshow(
        np.array(cka["matrix"], float), origin="lower", cmap="viridis", vmin=0, vmax=1
    )
    ax.set_xticks(range(len(layers)), layers)
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, label="linear CKA")
    ax.set_title(title)
    return save_figure(fig, path)


def attribute_curves(
    steps: list[int], layers: list[int], attributes: dict, path: str | Path, title: str
) -> Path:
    """Selectivity (accuracy − control-task accuracy) per layer over training, per attribute.

    ``attributes`` maps attribute → statistic → [step][layer] (None where not measured).
    """
    names = list(attributes)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        per_step = attributes[name]["selectivity"]
        for i, layer in enumerate(layers):
            ax.plot(
                steps,
                [row[i] if row and row[i] is not None else float("nan") for row in per_step],
                "o-",
                ms=3,
                label=f"layer {layer}",
            )
        ax.set_title(name, fontsize=10)
        ax.axhline(0, color="black", lw=0.5)
        _step_axis(ax, steps)
    axes[0][0].set_ylabel("selectivity (accuracy − control)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, path)


def study_curves(study: dict, path: str | Path) -> Path:
    """Each variant's best-layer pcorr (mean over seeds, 95% t-band) and validation loss."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for i, v in enumerate(study["variants"]):
        agg = v["aggregate"]
        steps = agg["steps"]
        color = f"C{i}"
        top.plot(steps, _nan(agg["best_pcorr_mean"]), "o-", color=color, ms=4, label=v["name"])
        bands = agg["best_pcorr_ci95"]
        top.fill_between(
            steps,
            [b[0] if b else float("nan") for b in bands],
            [b[1] if b else float("nan") for b in bands],
            color=color,
            alpha=0.15,
        )
        if v.get("floor") is not None:
            top.axhline(v["floor"], color=color, lw=0.8, ls=":")
        bottom.plot(steps, _nan(agg["val_loss_mean"]), "o-", color=color, ms=3, label=v["name"])
    top.axhline(0, color="black", lw=0.5)
    top.set_ylabel("pcorr, best layer (test)")
    top.set_title(
        f"Signal over training, mean of {len(study['config']['seeds'])} seeds with 95% t-band "
        "(dotted: detection floors)"
    )
    top.legend(fontsize=8)
    bottom.set_ylabel("validation loss (nats/token)")
    bottom.legend(fontsize=8)
    _step_axis(bottom, study["variants"][0]["aggregate"]["steps"])
    return save_figure(fig, path)


def study_comparison(study: dict, path: str | Path) -> Path:
    """Final pcorr per variant (seeds as dots, mean with 95% t-interval) and the effect of
    each variant against the baseline (Welch 95% interval)."""
    variants = study["variants"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.5 * len(variants) + 2.8))
    for i, v in enumerate(variants):
        est = v["final_pcorr"]
        y = len(variants) - 1 - i
        seeds = v["final_pcorr"]["per_seed"]
        left.plot(seeds, [y] * len(seeds), "o", color="grey", alpha=0.6, ms=5)
        if est["ci95"]:
            left.errorbar(
                est["mean"],
                y,
                xerr=[[est["mean"] - est["ci95"][0]], [est["ci95"][1] - est["mean"]]],
                fmt="D",
                color="C0",
                capsize=4,
            )
        else:
            left.plot(est["mean"], y, "D", color="C0")
        if v.get("floor") is not None:
            left.plot([v["floor"]], [y], "|", color="C3", ms=14, mew=2)
    left.set_yticks(range(len(variants)), [v["name"] for v in reversed(variants)])
    left.axvline(0, color="black", lw=0.5)
    left.set_xlabel("final pcorr, best layer (test)")
    left.set_title("Final signal: seeds (dots), mean ± 95% CI, floor (red bar)", fontsize=9)
    rows = [e for e in study["effects"] if e["metric"] == "final_pcorr"]
    for j, e in enumerate(rows):
        y = len(rows) - 1 - j
        color = "C3" if e["excludes_zero"] else "C7"
        if e["ci95"]:
            lo, hi = e["ci95"]
            right.errorbar(
                e["difference"],
                y,
                xerr=[[e["difference"] - lo], [hi - e["difference"]]],
                fmt="o",
                color=color,
                capsize=4,
            )
        else:
            right.plot(e["difference"], y, "o", color=color)
    right.set_yticks(range(len(rows)), [e["variant"] for e in reversed(rows)])
    right.axvline(0, color="black", lw=0.8)
    right.set_xlabel(f"difference in final pcorr vs {study['baseline']}")
    right.set_title("Effect vs baseline, Welch 95% CI (red: excludes 0)", fontsize=9)
    fig.suptitle(study.get("question") or study["name"])
    return save_figure(fig, path)
