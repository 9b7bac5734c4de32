"""Report pages for bridges (``nnobs.bridge``) and edits carried across them
(``nnobs.bridge_edit``), drawn from the result documents alone; nothing is recomputed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nnobs.report.page import Page, escape, interval, number
from nnobs.report.plots import plt, save_figure

HYBRID_WORDS = {
    "sparse_hybrid": "sparse model continued from the encoded dense stream",
    "dense_hybrid": "dense model continued from the decoded sparse stream",
}


def _errorbars(ax, x, stats: list[dict], **style) -> None:
    values = np.array([s["value"] for s in stats], dtype=float)
    bounds = np.array([s["ci95"] for s in stats], dtype=float)
    err = np.abs(bounds.T - values)
    ax.errorbar(x, values, yerr=err, capsize=3, marker="o", **style)


def bridge_sites_plot(doc: dict[str, Any], path: str | Path) -> Path:
    """Per site: NMSE both ways (left); the hybrid passes' loss minus the dense model's on the
    same tokens, with the sparse model's (right); 95% intervals over documents."""
    sites = doc["sites"]
    x = np.arange(len(sites))
    labels = [f"L{s['layer']} {s['sublayer']}" for s in sites]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    _errorbars(left, x - 0.05, [s["nmse_encode"] for s in sites], label="encode (dense→sparse)")
    _errorbars(left, x + 0.05, [s["nmse_decode"] for s in sites], label="decode (sparse→dense)")
    left.set_ylabel("NMSE (held out)")
    for hybrid, colour in (("sparse_hybrid", "tab:green"), ("dense_hybrid", "tab:purple")):
        stats = [s[hybrid]["loss_gap_dense"] for s in sites]
        _errorbars(right, x, stats, color=colour, label=HYBRID_WORDS[hybrid])
    gap = doc["models"]["sparse"]["loss_gap_dense"]
    right.axhline(gap["value"], color="tab:red", linestyle="--", label="sparse model alone")
    right.axhspan(*gap["ci95"], color="tab:red", alpha=0.12)
    right.axhline(0, color="black", linestyle="--", label="dense model alone")
    right.set_ylabel("next-token loss − the dense model's (nats)")
    for ax in (left, right):
        ax.set_xticks(x, labels, rotation=45, fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def training_curve_plot(doc: dict[str, Any], path: str | Path) -> Path:
    """The objective's parts over training steps."""
    curve = doc["training_curve"]
    steps = [row["step"] for row in curve]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key, label in (("nmse_enc", "NMSE encode"), ("nmse_dec", "NMSE decode"),
                       ("kl", "KL(dense ‖ hybrid)")):  # fmt: skip
        ax.plot(steps, [row[key] for row in curve], label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("mean over sites (training batches)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def _stat(s: dict, digits: int = 3) -> str:
    return f"{number(s['value'], digits, sign=False)} {interval(s['ci95'], digits)}"


def render_bridge(doc: dict[str, Any], out: str | Path) -> Path:
    """Write ``out/index.html`` for a bridge result; returns its path."""
    page = Page(Path(out), "nnobs bridge")
    dense, sparse, s = doc["dense"], doc["sparse"], doc["settings"]
    held = doc["heldout"]
    page.add("<h2>Bridges between the dense and the sparse model</h2>")
    page.add(
        f'<p class="meta">dense {escape(dense["path"])} (step {dense["step"]}), sparse '
        f"{escape(sparse['path'])} (step {sparse['step']}); AbsTopK k = {doc['shape']['k']} of "
        f"{doc['shape']['d_sparse']}; {s['steps']} steps of {s['batch_size']}×{s['seq_len']} "
        f"tokens; coefficients LM {s['lm_coef']}, NMSE {s['nmse_coef']}, KL {s['kl_coef']}. "
        f"Held out: {escape(held['corpus'])} ({escape(held['split'])}), {doc['n_tokens']} tokens "
        f"of {doc['n_documents']} documents; 95% intervals over documents "
        f"({doc['n_boot']} resamples).</p>"
    )
    models = doc["models"]
    page.add(
        f"<p>Each model alone: dense loss {_stat(models['dense']['loss'])}, sparse loss "
        f"{_stat(models['sparse']['loss'])} nats (sparse − dense, paired: "
        f"{_stat(models['sparse']['loss_gap_dense'], 4)}).</p>"
    )
    page.figure("bridge_sites", lambda p: bridge_sites_plot(doc, p),
                "NMSE of the encoder and decoder per site, and each hybrid pass's next-token loss "
                "above the dense model's on the same tokens (the sparse model's for comparison). "
                "Data: bridge.json.")  # fmt: skip
    page.table(
        ["site", "NMSE encode", "NMSE decode",
         "sh loss − dense", "KL dense‖sh", "KL sparse‖sh",
         "dh loss − dense", "KL dense‖dh", "KL sparse‖dh"],
        [[escape(site["site"]), _stat(site["nmse_encode"]), _stat(site["nmse_decode"]),
          _stat(site["sparse_hybrid"]["loss_gap_dense"], 4),
          _stat(site["sparse_hybrid"]["kl_dense"], 4),
          _stat(site["sparse_hybrid"]["kl_sparse"], 4),
          _stat(site["dense_hybrid"]["loss_gap_dense"], 4),
          _stat(site["dense_hybrid"]["kl_dense"], 4), _stat(site["dense_hybrid"]["kl_sparse"], 4)]
         for site in doc["sites"]],
        numeric=set(range(1, 9)),
    )  # fmt: skip
    page.add(
        '<p class="meta">sh: the sparse model continued from the encoded dense stream at the site; '
        "dh: the dense model continued from the decoded sparse stream; loss − dense: the pass's "
        "next-token loss minus the dense model's on the same tokens. KL per token, nats.</p>"
    )
    if doc["training_curve"]:
        page.figure("bridge_training", lambda p: training_curve_plot(doc, p),
                    "The objective's parts over training (training batches).")  # fmt: skip
    return page.write()


def edit_curve_plot(doc: dict[str, Any], path: str | Path) -> Path:
    """The counterfactual-answer probability against α, edit and control, with intervals."""
    curve = doc["curve"]
    alphas = [row["alpha"] for row in curve]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, colour, label in (
        ("edit", "tab:blue", f"edit {doc['channel']['site']}:{doc['channel']['channel']}"),
        ("control", "tab:grey", f"control ({len(doc['controls'])} random channels)"),
    ):
        mean = np.array([row[key]["value"] for row in curve])
        bounds = np.array([row[key]["ci95"] for row in curve])
        ax.plot(alphas, mean, marker="o", color=colour, label=label)
        ax.fill_between(alphas, bounds[:, 0], bounds[:, 1], color=colour, alpha=0.2)
    ax.set_xlabel("strength α")
    ax.set_ylabel("dense model's P(counterfactual answer)")
    ax.set_ylim(0, 1)
    ax.set_title(doc["task"]["name"], fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def render_bridge_edit(doc: dict[str, Any], out: str | Path) -> Path:
    """Write ``out/index.html`` for an edit-transfer result; returns its path."""
    page = Page(Path(out), "nnobs bridge edit")
    ch, test, task = doc["channel"], doc["test"], doc["task"]
    page.add("<h2>An edit carried from the sparse model into the dense one</h2>")
    chosen = doc["chosen_by"]
    how = (
        "given"
        if chosen["method"] == "given"
        else f"the residual read of the pruned circuit ({chosen['n_nodes']} nodes, held-out task "
        f"loss {chosen['heldout_loss']:.3f}) with the largest mean |Δ|"
    )
    aligned = (
        "prompts of unequal length lined up at their last token"
        if doc["settings"].get("align_right")
        else f"{doc['items']['n_left_out']} left out for prompts of unequal length"
    )
    page.add(
        f'<p class="meta">task {escape(task["name"])} ({escape(task["split"])} items: '
        f"{doc['items']['n_used']} used, {escape(aligned)}); channel "
        f"{escape(ch['site'])}:{ch['channel']} ({escape(how)}); mean "
        f"|Δ| {ch['mean_abs_delta']:.3f}; residual RMS sparse {ch['rms_sparse']:.3f}, dense "
        f"{ch['rms_dense']:.3f}; controls: channels {', '.join(map(str, doc['controls']))}, "
        "same Δ, direction rescaled to the edit's norm.</p>"
    )
    effect = test["effect"]
    page.add(
        f'<p class="answer">At α = 1 the edit raises the dense model\'s probability of the '
        f"counterfactual answer by {number(effect['value'])} {interval(effect['ci95'])} more "
        f"than the random-channel control (sign-flip test, one-sided, p = {test['p_value']:.4f}, "
        f"level {test['level']}): <b>{escape(test['verdict'].replace('_', ' '))}</b>.</p>"
    )
    page.figure("edit_curve", lambda p: edit_curve_plot(doc, p),
                "P(counterfactual answer) against the edit's strength, for the edit and for the "
                "controls; 95% intervals over items. Data: edit.json.")  # fmt: skip
    rows = [[f"{r['alpha']:.2f}", _stat(r["edit"]), _stat(r["control"])] for r in doc["curve"]]
    page.table(["α", "edit P(cf)", "control P(cf)"], rows, numeric={0, 1, 2})
    return page.write()
