"""The causal test of the decision-quality probe: remove its direction, see what changes.

:func:`direction_intervention` projects the probe's direction out of the residual stream (or
scales it) at the probe's layer, on windows of a corpus cut by the protocol's windowing policy,
and reports what happens to the loss, to the model's confidence and to the probe signal at
later layers, measured by the protocol's own capture, label and controlled pcorr.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from nnobs.core.errors import NnobsError
from nnobs.data.corpus import load_corpus
from nnobs.data.tokenizer import Tokenizer
from nnobs.data.windows import Windows, document_windows
from nnobs.interventions.ablation import AblationSettings, change_summary, windows_info
from nnobs.interventions.targets import make_target, project_out, result_document, scale_edit
from nnobs.models.adapter import Edit, ModelAdapter
from nnobs.observe.capture import capture
from nnobs.observe.signal import fit_probe, pcorr
from nnobs.observe.splits import SplitData

DIRECTION_MODES = ("project_out", "scale")


def _direction_pass(
    adapter: ModelAdapter,
    windows: Windows,
    layers: Sequence[int],
    edits: dict[str, Edit],
    batch_size: int,
) -> SplitData:
    """One capture of ``windows`` (float32, in memory) at the residual stream after each of
    ``layers``, with ``edits`` applied: the protocol's per-token loss, confidence and norms."""
    sites = [adapter.site_name(layer) for layer in layers]
    cap = capture(
        adapter,
        windows,
        sites,
        batch_size=batch_size,
        dtype=np.float32,
        progress=False,
        edits=edits,
    )
    return SplitData("windows", cap)


def _per_window(values: np.ndarray, windows: Windows) -> np.ndarray:
    """The mean of per-token ``values`` over each window's scored tokens."""
    counts = windows.valid.sum(1)
    rows = np.repeat(np.arange(len(counts)), counts)
    return np.bincount(rows, weights=values, minlength=len(counts)) / counts


def fit_layer_probes(
    adapter: ModelAdapter,
    layers: Sequence[int],
    windows: Windows,
    batch_size: int = 16,
) -> dict[int, np.ndarray]:
    """Decision-quality probe directions at ``layers`` fitted on ``windows``: the protocol's
    sweep probe of its label (loss worse than max softmax and norm predict)."""
    train = _direction_pass(adapter, windows, layers, {}, batch_size)
    device = str(adapter.device)
    # The sweep probe fits every row: no resample, so its seed plays no part.
    return {
        layer: fit_probe(train, adapter.site_name(layer), 0, False, device).direction
        for layer in layers
    }


def direction_intervention(
    adapter: ModelAdapter,
    layer: int,
    direction: np.ndarray | Sequence[float],
    windows: Windows,
    settings: AblationSettings | None = None,
    *,
    mode: str = "project_out",
    factor: float = 0.0,
    probes: dict[int, np.ndarray] | None = None,
) -> dict:
    """Remove (``project_out``) or scale (``scale`` by ``factor``) the component of the
    residual stream after block ``layer`` along ``direction``, on every scored token of
    ``windows``, and report the change in mean loss and in mean max softmax (intervals over
    windows), and for each later layer with a probe in ``probes`` (layer -> direction) the
    probe's pcorr (the protocol's statistic) before and after. Pass the observe result's
    ``probe.layer`` and ``probe.direction`` (see :func:`probe_from_observe`).
    """
    settings = settings or AblationSettings()
    if mode not in DIRECTION_MODES:
        raise NnobsError(f"unknown direction mode {mode!r}: use {' or '.join(DIRECTION_MODES)}")
    site = adapter.site_name(layer)
    target = make_target(adapter, site, direction=direction)
    edit: Edit = project_out(target) if mode == "project_out" else scale_edit(target, factor)
    later = sorted(probes) if probes else []
    for l_probe in later:
        if not layer < l_probe < adapter.n_layers:
            raise NnobsError(
                f"probe layer {l_probe} is not after the intervention layer {layer} "
                f"(the model has layers 0..{adapter.n_layers - 1})"
            )
    layers = [layer, *later]
    before = _direction_pass(adapter, windows, layers, {}, settings.batch_size)
    after = _direction_pass(adapter, windows, layers, {site: edit}, settings.batch_size)

    def change(column: str) -> dict[str, Any]:
        base, new = (_per_window(getattr(d.cap, column), windows) for d in (before, after))
        return change_summary(base, new, settings.n_boot, settings.seed)

    unit = target.direction.numpy()
    signal = []
    for l_probe in later:
        s, w = adapter.site_name(l_probe), np.asarray(probes[l_probe], dtype=np.float64)
        signal.append(
            {
                "layer": l_probe,
                "pcorr_before": pcorr(before.acts(s) @ w, before, s),
                "pcorr_after": pcorr(after.acts(s) @ w, after, s),
            }
        )
    result = {
        "layer": layer,
        "site": site,
        "mode": mode,
        "factor": factor if mode == "scale" else 0.0,
        "loss": change("loss"),
        "max_softmax": change("max_softmax"),
        "component": {
            "before": float(np.abs(before.acts(site) @ unit).mean()),
            "after": float(np.abs(after.acts(site) @ unit).mean()),
        },
        "later_layers": signal,
    }
    return result_document(
        adapter, "direction", asdict(settings), windows=windows_info(windows), direction=result
    )


def probe_from_observe(doc: dict) -> tuple[int, np.ndarray]:
    """The (layer, unit direction) of the probe stored in an ``nnobs observe`` result."""
    probe = doc.get("probe") if isinstance(doc, dict) else None
    if not isinstance(probe, dict) or "direction" not in probe or "layer" not in probe:
        raise NnobsError("the result has no probe direction: pass an nnobs observe result")
    return int(probe["layer"]), np.asarray(probe["direction"], dtype=np.float64)


# What names the weights a result was computed from: a run's checkpoint (config hash, step,
# path) or a Hugging Face model (config hash, source, revision, commit); the most telling first.
MODEL_IDENTITY = ("kind", "config_hash", "step", "source", "revision", "commit", "path")


def other_model(doc: dict, adapter: ModelAdapter) -> str | None:
    """How the model an observe result was computed on differs from ``adapter``'s (the first
    identifying field of their provenance that differs), or None for the same model: a probe
    direction means nothing in another model's residual stream, even of the same width."""
    recorded = doc.get("provenance") if isinstance(doc, dict) else None
    if not isinstance(recorded, dict):
        return "the result records no provenance"
    for key in MODEL_IDENTITY:
        there, here = recorded.get(key), adapter.provenance.get(key)
        if there != here and (key == "kind" or (there is not None and here is not None)):
            return f"{key} {there!r} there, {here!r} here"
    return None


def direction_windows(
    tokenizer: Tokenizer, corpus: str, split: str, n_windows: int, length: int, seed: int = 0
) -> Windows:
    """Windows of a corpus split for the direction test, under the protocol's windowing policy
    (:func:`nnobs.data.windows.document_windows`: none crosses a document boundary): a budget
    of ``n_windows × length`` scored tokens spread over the split's documents, windows of
    ``length`` inputs."""
    if n_windows < 1 or length < 2:
        raise NnobsError("need at least one window of at least 2 tokens")
    docs = load_corpus(corpus).split(split)
    return document_windows(docs, tokenizer, length, n_windows * length, seed=seed, split=split)
