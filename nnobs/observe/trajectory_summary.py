"""A trajectory's once-per-run statistics, from its checkpoint records: the random-init null and
its floor, CKA of every layer to the final checkpoint, and the collapse verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import norm

from nnobs.measure.cka import cka_matrix, linear_cka
from nnobs.observe.collapse import detect_collapse, sd_from_interval


def random_init_floor(init: dict[str, Any] | None, level: float = 0.05) -> dict[str, Any] | None:
    """The null of the run's verdicts: the randomly initialised model's record (``init``, with
    its ``source``), measured like every checkpoint. Its best-layer headline (with its standard
    deviation) is the headline series' null, each layer of its profile that layer's null;
    ``value`` is the headline's floor, the null plus its one-sided ``1 - level`` normal
    quantile. None when there is no usable record.

    Random heads on *trained* checkpoints are not a null: random directions of a trained
    residual stream carry learned structure (their |pcorr| grows with training); they are a
    baseline for the probe, reported per checkpoint.
    """
    if init is None or init.get("status") == "failed" or "best" not in init:
        return None
    best = init["best"]
    null_sd = _sd(best)
    return {
        "value": float(best["ensemble"] + norm.isf(level) * null_sd),
        "null_value": best["ensemble"],
        "null_sd": null_sd,
        "level": level,
        "source": init["source"],
        "statistic": "the best layer's seed-ensemble pcorr on the test split",
        "random_init_per_layer": [r["pcorr"] for r in init["layers"]],
        "random_init_per_layer_sd": [
            None if r["pcorr"] is None else sd_from_interval(*r["ci95"]) for r in init["layers"]
        ],
    }


def _sd(best: dict[str, Any]) -> float:
    """A headline's standard deviation (records from before it was stored: from its interval)."""
    if "ensemble_sd" in best:
        return best["ensemble_sd"]
    return sd_from_interval(*best["ensemble_ci95"])


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


def collapse_verdict(
    observed: list[dict[str, Any]], floor: dict[str, Any], level: float = 0.05
) -> dict[str, Any]:
    """The collapse verdict (:func:`nnobs.observe.collapse.detect_collapse`) of the observed
    checkpoint records, in step order, against the random-init null in ``floor``."""
    # The trainer's validation loss where every step has one; else the mean loss on the
    # probe's validation tokens, which every measured checkpoint has.
    key = "val_loss" if all(r["val_loss"] is not None for r in observed) else None
    layers = [layer["layer"] for layer in observed[0]["layers"]]
    series = {
        HEADLINE: ([r["best"]["ensemble"] for r in observed], [_sd(r["best"]) for r in observed])
    }
    null = {HEADLINE: (floor["null_value"], floor["null_sd"])}
    for i, layer in enumerate(layers):
        null_value, null_sd = (
            floor["random_init_per_layer"][i],
            floor["random_init_per_layer_sd"][i],
        )
        if null_value is None:  # the random-init layer could not be measured: no null
            continue
        rows = [_signal(r["layers"][i]) for r in observed]
        series[layer] = ([v for v, _ in rows], [sd for _, sd in rows])
        null[layer] = (null_value, null_sd)
    collapse = detect_collapse(
        steps=[r["step"] for r in observed],
        val_loss=[r[key or "capture_val_loss"] for r in observed],
        series=series,
        null=null,
        headline=HEADLINE,
        level=level,
    )
    if collapse["peak_step"] is not None:  # name the layer the headline peaked at
        at_peak = next(r for r in observed if r["step"] == collapse["peak_step"])
        collapse["peak_layer"] = at_peak["best"]["layer"]
        if collapse["verdict"] == "erased":
            collapse["layer"] = collapse["peak_layer"]
    collapse["loss"] = "trainer validation loss" if key else "probe validation tokens"
    return collapse


HEADLINE = "best layer"


def _signal(row: dict[str, Any]) -> tuple[float, float]:
    """(pcorr, sd) of a layer: an undefined statistic (a constant representation) carries no
    readable signal and counts as 0 with no spread."""
    if row["pcorr"] is None:
        return 0.0, 0.0
    return row["pcorr"], sd_from_interval(*row["ci95"])
