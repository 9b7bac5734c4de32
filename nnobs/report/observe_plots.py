"""The observe page's evidence figures, drawn from an observe result (``nnobs.observe``) alone:
every value plotted is read from the document; nothing here recomputes a statistic."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from nnobs.report.plots import save_figure


def null_distribution(result: dict, path: str | Path) -> Path:
    """The verdict's null: the normal density where the headline would fall if the model
    carried no more than random-init models of its architecture (``null.null_mean``,
    ``null.predictive_sd``), each null model's value as a tick, the floor, and the headline
    with its interval."""
    null, head = result["null"], result["headline"]
    mean, sd, floor = null["null_mean"], null["predictive_sd"], null["floor"]
    values = [m["ensemble"] for m in null["models"]]
    lo, hi = head["ensemble_ci95"]
    points = [mean - 4 * sd, mean + 4 * sd, floor, lo, hi, head["ensemble"], *values]
    pad = 0.05 * (max(points) - min(points))
    x = np.linspace(min(points) - pad, max(points) + pad, 400)
    density = np.exp(-0.5 * ((x - mean) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
    top = float(density.max())

    fig = Figure(figsize=(7, 3.8))
    ax = fig.subplots()
    ax.plot(x, density, color="grey", label=f"null: normal({mean:+.3f}, sd {sd:.3f})")
    beyond = x >= floor
    ax.fill_between(
        x[beyond], density[beyond], color="C3", alpha=0.2, label=f"{null['level']:g} of the null"
    )
    ax.plot(
        values,
        [0.0] * len(values),
        "|",
        color="black",
        ms=18,
        mew=2,
        label=f"random-init models ({len(values)})",
    )
    ax.axvline(floor, color="C3", ls="--", lw=1.2, label=f"floor {floor:+.3f}")
    ax.axvline(head["ensemble"], color="C0", lw=1.5)
    ax.errorbar(
        [head["ensemble"]],
        [0.6 * top],
        # a percentile interval need not contain the estimate
        xerr=[[max(0.0, head["ensemble"] - lo)], [max(0.0, hi - head["ensemble"])]],
        fmt="o",
        color="C0",
        capsize=5,
        label=f"headline {head['ensemble']:+.3f} [{lo:+.3f}, {hi:+.3f}]",
    )
    ax.set_ylim(bottom=-0.08 * top)
    ax.set_xlabel("pcorr at the reported layer (test split)")
    ax.set_ylabel("density")
    ax.set_title(
        f"Headline against the random-init null (layer {null['layer']}): p = {null['p_value']:.3g}",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return save_figure(fig, path)


def control_sensitivity(result: dict, path: str | Path) -> Path:
    """The headline score's pcorr under each covariate set; the verdict's set (standard)
    highlighted."""
    sets = result["controls"]["pcorr"]
    names = list(sets)
    fig = Figure(figsize=(7, 3.4))
    ax = fig.subplots()
    colors = ["C3" if n == "standard" else "C0" for n in names]
    bars = ax.bar(range(len(names)), [sets[n] for n in names], color=colors)
    ax.bar_label(bars, labels=[f"{sets[n]:+.3f}" for n in names], fontsize=8, padding=2)
    ax.set_xticks(range(len(names)), [n.replace("_", " ") for n in names], fontsize=9)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_ylabel("partial Spearman with loss")
    ax.set_xlabel("covariates controlled for")
    ax.set_title("Control sensitivity (test): red is the verdict's standard set", fontsize=10)
    ax.margins(y=0.15)
    return save_figure(fig, path)


def flagging_precision(result: dict, path: str | Path) -> Path:
    """Share of high-loss tokens among those flagged, by the probe and by low confidence, at
    each flag rate; the share of high-loss tokens overall as the chance level."""
    rows = result["flagging"]
    rates = [100 * r["rate"] for r in rows]
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    ax.plot(rates, [r["probe_precision"] for r in rows], "o-", color="C0", label="probe score")
    ax.plot(
        rates,
        [r["confidence_precision"] for r in rows],
        "s--",
        color="C1",
        label="low max softmax",
    )
    if all("n_high_loss" in r and "n_tokens" in r for r in rows):
        chance = rows[0]["n_high_loss"] / rows[0]["n_tokens"]
        ax.axhline(chance, color="grey", ls=":", label=f"chance ({chance:.2f})")
    ax.set_xticks(rates, [f"{r:g}%" for r in rates])
    ax.set_xlabel("share of test tokens flagged")
    ax.set_ylabel("precision (flagged with above-median loss)")
    ax.set_title("Flagging high-loss tokens: probe vs confidence", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)


def label_rates(result: dict, path: str | Path) -> Path:
    """Each probe label's positive rate per max-softmax decile of the probe's training
    tokens: a label aligned with the controlled statistic stays near 0.5 in every decile."""
    label = result["label"]
    edges = label["max_softmax_edges"]
    deciles = range(1, len(edges))
    fig = Figure(figsize=(6, 3.4))
    ax = fig.subplots()
    for i, name in enumerate(label_names(label)):
        rates = [np.nan if v is None else v for v in label[name]]
        used = " (used)" if name == result["headline"]["label"] else ""
        ax.plot(deciles, rates, "o-", color=f"C{i}", ms=4, label=f"{name}{used}")
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.set_xticks(list(deciles), [f"{e:.2f}" for e in edges[1:]], fontsize=8, rotation=45)
    ax.set_ylim(0, 1)
    ax.set_xlabel("max-softmax decile (upper edge)")
    ax.set_ylabel("share labelled positive")
    ax.set_title("Probe labels by confidence (probe-training tokens)", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)


def label_names(label: dict) -> list[str]:
    """The labels whose per-decile rates the result's ``label`` record holds."""
    return [k for k, v in label.items() if k != "max_softmax_edges" and isinstance(v, list)]
