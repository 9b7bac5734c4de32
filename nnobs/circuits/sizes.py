"""Circuit sizes of one model over many tasks: prune each task, count edges and nodes.

:func:`circuit_sizes` is the per-model measurement behind the dense-vs-sparse comparison and
the size-vs-loss studies. For every task it prunes a circuit (:class:`CircuitPruner`, the
paper's defaults unless overridden) on the task's train items, bisects on its held-out items
to the target loss, and counts the circuit's edges and nodes per kind. Pruned nodes are
mean-ablated over windows of the model's own pretraining corpus (train split, as the
trainer reads them). Each task's record is written to ``<out>/<task>.json`` as soon as it is
done, atomically, with the settings it was computed under: a second call with the same
settings reads the records instead of pruning again, so an interrupted call resumes.

A task the full model cannot do to the target loss is recorded as not reached (with the
full model's held-out loss) and kept in the returned table; it is left out of the geometric
mean, and ``not_reached`` names it.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nnobs.circuits.edges import circuit_edges
from nnobs.circuits.nodes import NODE_KINDS, circuit_adapter, node_counts, node_locations
from nnobs.circuits.prune import CircuitPruner
from nnobs.circuits.task_loss import task_loss
from nnobs.core.errors import NnobsError
from nnobs.core.files import read_json, write_json
from nnobs.core.rundir import read_meta, resolve_checkpoint
from nnobs.data.python_tasks import PYTHON_TASKS, load_python_task
from nnobs.models.adapter import ModelAdapter

SIZE_FORMAT = "nnobs-circuit-size/1"
REFERENCE_SPLIT = "train"
REFERENCE_WINDOWS = 64
REFERENCE_LENGTH = 128
PRUNER_DEFAULTS: dict[str, Any] = {
    "k_coef": 1e-4,
    "lr": 3e-3,
    "steps": 500,
    "batch": 64,
    "ablation": "mean",
    "temperature": 1.0,
    "seed": 0,
}


def check_tasks(tasks: Sequence[str]) -> list[str]:
    """The task names, refused in one line if empty, repeated or not a built-in Python task."""
    names = list(tasks)
    if not names:
        raise NnobsError("no tasks given: name at least one Python task")
    unknown = [t for t in names if t not in PYTHON_TASKS]
    if unknown:
        raise NnobsError(
            f"unknown Python task {unknown[0]!r}: choose from {', '.join(PYTHON_TASKS)}"
        )
    if len(set(names)) != len(names):
        raise NnobsError(f"a task is named twice in {', '.join(names)}")
    return names


def pruner_settings(target_loss: float, overrides: dict | None) -> dict[str, Any]:
    """The pruner's full settings: the paper's defaults, ``overrides``, and the target."""
    unknown = set(overrides or {}) - set(PRUNER_DEFAULTS)
    if unknown:
        raise NnobsError(
            f"unknown pruner setting {sorted(unknown)[0]!r}: choose from "
            f"{', '.join(PRUNER_DEFAULTS)}"
        )
    if not target_loss > 0:
        raise NnobsError(f"the target loss must be positive (nats), got {target_loss}")
    return {**PRUNER_DEFAULTS, **(overrides or {}), "target_loss": float(target_loss)}


def checkpoint_info(run: str | Path, step: int | None) -> dict[str, Any]:
    """The checkpoint ``run`` (a run or checkpoint directory) and ``step`` mean, from its
    metadata alone: path, step, config hash, validation loss, tokenizer and corpus."""
    ckpt = resolve_checkpoint(run, step)
    meta = read_meta(ckpt)
    return {
        "checkpoint": str(ckpt.resolve()),
        "step": int(meta["step"]),
        "config_hash": meta.get("config_hash"),
        "val_loss": meta.get("val_loss"),
        "tokenizer": (meta.get("tokenizer") or {}).get("fingerprint"),
        "vocab_size": (meta.get("config") or {}).get("vocab_size"),
        "corpus": (meta.get("corpus") or {}).get("spec"),
    }


def reference_windows(adapter: ModelAdapter, corpus: str | None):
    """Windows of the model's pretraining corpus for mean ablation, and where they came from."""
    from nnobs.data.windows import stream_windows

    if not corpus:
        raise NnobsError(
            "the checkpoint does not name its pretraining corpus, which mean ablation needs"
        )
    length = min(REFERENCE_LENGTH, int(adapter.context_length or REFERENCE_LENGTH))
    return stream_windows(adapter.tokenizer, corpus, REFERENCE_SPLIT, REFERENCE_WINDOWS, length)


def _settings(info: dict, pruner: dict, n_train: int, n_heldout: int) -> dict[str, Any]:
    """Everything a task's record depends on: a stored record with other settings is stale."""
    return {
        "checkpoint": info["checkpoint"],
        "step": info["step"],
        "config_hash": info["config_hash"],
        "pruner": pruner,
        "n_train": n_train,
        "n_heldout": n_heldout,
        "reference": {
            "split": REFERENCE_SPLIT,
            "n_windows": REFERENCE_WINDOWS,
            "max_length": REFERENCE_LENGTH,
        },
    }


def _stored(path: Path, settings: dict) -> dict | None:
    """The record at ``path`` if it was computed under ``settings``, else None."""
    if not path.is_file():
        return None
    try:
        record = read_json(path, "circuit size record")
    except NnobsError:
        return None  # damaged: computed again
    same = record.get("format") == SIZE_FORMAT and record.get("settings") == settings
    return record if same else None


def prune_task(
    adapter: ModelAdapter, name: str, pruner: dict, n_train: int, n_heldout: int, means_from
) -> dict[str, Any]:
    """Prune task ``name`` on ``adapter`` (with circuit sites); its sizes and losses.
    ``means_from``: a callable giving the reference windows (only called when pruning)."""
    start = time.perf_counter()
    tok = adapter.tokenizer
    train = load_python_task(name, tok, "train", n_train)
    heldout = load_python_task(name, tok, "heldout", n_heldout)
    full = task_loss(adapter, heldout)
    record: dict[str, Any] = {
        "task": name,
        "n_train": len(train),
        "n_heldout": len(heldout),
        "full_loss": full,
        "reached": full <= pruner["target_loss"],
        "edges": None,
        "nodes": None,
        "edges_by_kind": None,
        "nodes_by_kind": None,
        "heldout_loss": None,
        "curve": None,
    }
    if record["reached"]:
        fitted = CircuitPruner(**pruner).fit(adapter, train, heldout, reference=means_from())
        kinds = {loc.site: loc.kind for loc in fitted.locations_}
        by_kind = Counter(kinds[site] for site, _ in fitted.kept_)
        edges = circuit_edges(adapter, fitted.kept_)
        record.update(
            edges=edges["total"],
            nodes=len(fitted.kept_),
            edges_by_kind={k: v for k, v in edges.items() if k != "total"},
            nodes_by_kind={kind: by_kind[kind] for kind in NODE_KINDS},
            heldout_loss=fitted.heldout_loss_,
            curve={str(k): v for k, v in fitted.curve_.items()},
        )
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def geomean_edges(records: Sequence[dict]) -> float | None:
    """Geometric mean of ``edges + 1`` minus 1 over reached tasks (a circuit can have no edges:
    the embedding alone may do a task), None when no task was reached."""
    sizes = [r["edges"] for r in records if r["reached"]]
    if not sizes:
        return None
    return math.exp(sum(math.log(e + 1) for e in sizes) / len(sizes)) - 1


def circuit_sizes(
    run: str | Path,
    tasks: Sequence[str],
    out: str | Path,
    *,
    target_loss: float = 0.15,
    step: int | None = None,
    pruner: dict | None = None,
    n_train: int = 512,
    n_heldout: int = 128,
    device: str = "cpu",
    progress: bool = True,
    desc: str = "circuit sizes",
) -> dict[str, Any]:
    """Circuit size of every task in ``tasks`` on the model ``run`` (checkpoint ``step``, else
    the last), one record per task in ``out/<task>.json`` (resumable). Returns the records as
    ``tasks`` (name → edges, nodes, their counts per kind, held-out and full-model losses,
    reached, seconds), ``geomean_edges`` over reached tasks, ``reached`` and ``not_reached``
    (task names), ``model`` (checkpoint, step, validation loss, node and edge totals) and
    ``settings``. ``desc`` labels the progress bar."""
    from tqdm import tqdm

    names = check_tasks(tasks)
    settings = pruner_settings(target_loss, pruner)
    if n_train < 1 or n_heldout < 1:
        raise NnobsError("need at least one train and one held-out item per task")
    info = checkpoint_info(run, step)
    common = _settings(info, settings, n_train, n_heldout)
    out = Path(out)
    records = {name: _stored(out / f"{name}.json", common) for name in names}
    adapter, model_totals = None, None
    windows: list = []  # the reference windows, read once when the first task is pruned

    def means_from():
        if not windows:
            windows.append(reference_windows(adapter, info["corpus"])[0])
        return windows[0]

    pending = [name for name in names if records[name] is None]
    if pending:
        adapter, model_totals = _load(run, info["step"], device)
        for name in pending:  # a task without single-token answers is refused before any work
            load_python_task(name, adapter.tokenizer, "heldout", 1)
    bar = tqdm(names, desc=desc, unit="task", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        if records[name] is not None:
            continue
        record = prune_task(adapter, name, settings, n_train, n_heldout, means_from)
        records[name] = {
            "format": SIZE_FORMAT,
            "settings": common,
            "model_totals": model_totals,
            **record,
        }
        write_json(out / f"{name}.json", records[name])
    return _summary(info, common, records)


def _load(run: str | Path, step: int, device: str) -> tuple[ModelAdapter, dict]:
    from nnobs.models.load import load_model

    adapter = circuit_adapter(load_model(run, device=device, step=step))
    locations = node_locations(adapter)
    everything = [(loc.site, i) for loc in locations for i in range(loc.width)]
    totals = {"nodes": node_counts(locations), "edges": circuit_edges(adapter, everything)}
    return adapter, totals


def _summary(info: dict, settings: dict, records: dict) -> dict[str, Any]:
    reached = [n for n, r in records.items() if r["reached"]]
    stored = ("format", "settings", "model_totals")
    return {
        "model": {**info, "totals": next(iter(records.values()))["model_totals"]},
        "settings": settings,
        "tasks": {n: {k: v for k, v in r.items() if k not in stored} for n, r in records.items()},
        "reached": reached,
        "not_reached": [n for n in records if n not in reached],
        "geomean_edges": geomean_edges(list(records.values())),
    }
