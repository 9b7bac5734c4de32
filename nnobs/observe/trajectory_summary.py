"""A trajectory's once-per-run statistics, from its checkpoint records: the detection floor, CKA
of every layer to the final checkpoint, and the collapse verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nnobs.measure import stats
from nnobs.measure.cka import cka_matrix, linear_cka
from nnobs.observe.collapse import detect_collapse


def random_init_floor(init: dict[str, Any] | None) -> dict[str, Any] | None:
    """pcorr where no learned signal can exist: the randomly initialised model's record
    (``init``, with its ``source``), probed at every layer and read by random heads at its
    best layer; the floor is the 95% quantile of those |pcorr|. None when there is no usable
    record.

    Random heads on *trained* checkpoints are not pooled in: random directions of a trained
    residual stream carry learned structure (their |pcorr| grows with training), so they are a
    baseline for the probe, reported per checkpoint, not a null for the signal.
    """
    if init is None or init.get("status") == "failed" or "random_head" not in init:
        return None
    layer_values = np.abs([r["pcorr"] for r in init["layers"] if r["pcorr"] is not None])
    summary = stats.detection_floor(
        np.concatenate([layer_values, init["random_head"]["abs_values"]])
    )
    return {
        "value": summary["floor"],
        "quantile": summary["quantile"],
        "n_null": summary["n"],
        "source": init["source"],
        "random_init_per_layer": [r["pcorr"] for r in init["layers"]],
        "random_init_heads_abs_q95": init["random_head"]["abs_q95"],
    }


def cka_to_final(
    samples: dict[int, dict[int, Path]],
) -> tuple[dict[int, list[float]], dict[str, Any]] | None:
    """Linear CKA of every layer to the same layer at the last step of ``samples`` (step ->
    layer -> saved activations), and that step's layer × layer matrix.

    Returns each step's row (one value per layer) and the matrix's record; None without
    samples.
    """
    if not samples:
        return None
    steps = list(samples)
    reference = {layer: np.load(path) for layer, path in samples[steps[-1]].items()}
    rows = {}
    for step in steps:
        row = []
        for layer, path in samples[step].items():
            X, Y = np.load(path), reference[layer]
            n = min(len(X), len(Y))
            row.append(linear_cka(X[:n], Y[:n]))
        rows[step] = row
    names, _, matrix = cka_matrix({str(k): v for k, v in reference.items()})
    return rows, {
        "method": "linear",
        "reference_step": steps[-1],
        "tokens": int(min(len(a) for a in reference.values())),
        "split": "validation",
        "layers": [int(n) for n in names],
        "matrix": matrix.tolist(),
    }


def collapse_verdict(observed: list[dict[str, Any]], floor: float) -> dict[str, Any]:
    """The collapse verdict (:func:`nnobs.observe.collapse.detect_collapse`) of the observed
    checkpoint records, in step order, against the detection floor."""
    # The trainer's validation loss where every step has one; else the mean loss on the
    # probe's validation tokens, which every measured checkpoint has.
    key = "val_loss" if all(r["val_loss"] is not None for r in observed) else None
    layers = [layer["layer"] for layer in observed[0]["layers"]]
    signal = [[_signal(r["layers"][i]) for r in observed] for i in range(len(layers))]
    collapse = detect_collapse(
        steps=[r["step"] for r in observed],
        val_loss=[r[key or "capture_val_loss"] for r in observed],
        pcorr={layer: [p for p, _ in signal[i]] for i, layer in enumerate(layers)},
        floor=floor,
        ci_low={layer: [low for _, low in signal[i]] for i, layer in enumerate(layers)},
    )
    collapse["loss"] = "trainer validation loss" if key else "probe validation tokens"
    return collapse


def _signal(row: dict[str, Any]) -> tuple[float, float]:
    """(pcorr, CI low) of a layer for collapse detection: an undefined statistic (a constant
    representation) carries no readable signal and counts as 0; a percentile interval from few
    documents can sit above its estimate, so its low end is capped there."""
    if row["pcorr"] is None:
        return 0.0, 0.0
    return row["pcorr"], min(row["ci95"][0], row["pcorr"])
