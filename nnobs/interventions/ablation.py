"""Ablation: knock out a component or a direction and measure what changes.

Modes: ``zero`` sets the target to 0; ``mean`` to its mean over a reference corpus (computed
once per model and corpus and cached on disk with its provenance); ``resample`` to its value
on another input (another window of the corpus, or another task item of the same length).
The measure is the change in next-token loss on corpus windows, or in a task's logit
difference, with a bootstrap interval over examples (windows or items).

The direction test of the decision-quality probe is :mod:`nnobs.interventions.direction`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_tensors
from safetensors.torch import save_file

from nnobs.core.errors import NnobsError
from nnobs.core.files import write_json
from nnobs.data.corpus import default_cache_dir
from nnobs.data.tasks import EncodedTask
from nnobs.data.windows import Windows
from nnobs.interventions.targets import Target, position_axis, replace_edit, result_document
from nnobs.measure import stats
from nnobs.models.adapter import ModelAdapter

MODES = ("zero", "mean", "resample")


# ------------------------------------------------------------------------- mean cache


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Short sha256 over every parameter and buffer (names, shapes, dtypes, bytes)."""
    h = hashlib.sha256()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def tokens_fingerprint(tokens: torch.Tensor | np.ndarray) -> str:
    array = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64))
    return hashlib.sha256(f"{array.shape}".encode() + array.tobytes()).hexdigest()[:16]


def default_means_dir() -> Path:
    return default_cache_dir() / "means"


def mean_activations(
    adapter: ModelAdapter,
    sites: Sequence[str],
    reference: torch.Tensor | np.ndarray,
    *,
    reference_info: dict | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 16,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Mean activation of each site over the reference token windows (batch and positions).

    Cached as a folder ``means-<key>/`` holding ``means.safetensors`` and ``meta.json`` (the
    provenance), written whole and renamed into place, so a kill never leaves half an entry;
    an entry that is damaged anyway is computed again. The key hashes the model's weights and
    the reference tokens, so a change in either (another checkpoint, a different corpus, more
    tokens) misses the cache. Returns the means and a description of the cache entry (its
    path, whether it was a hit, what it was computed from).
    """
    tokens = torch.as_tensor(np.asarray(reference), dtype=torch.long)
    if tokens.dim() != 2 or tokens.numel() == 0:
        raise NnobsError("the mean-ablation reference must be a non-empty (windows, tokens) array")
    for site in sites:
        adapter.resolve(site)
        if position_axis(site) != 1:
            raise NnobsError(f"{site!r} has no mean over positions: ablate head_out instead")
    model_fp = weights_fingerprint(adapter.model)
    ref_fp = tokens_fingerprint(tokens)
    key = hashlib.sha256(f"{model_fp}:{ref_fp}".encode()).hexdigest()[:16]
    entry = (Path(cache_dir) if cache_dir is not None else default_means_dir()) / f"means-{key}"
    stored, meta = _read_means(entry)
    missing = [s for s in sites if s not in stored]
    if missing:
        stored.update(_compute_means(adapter, missing, tokens, batch_size))
        meta = {
            "model": {"weights": model_fp, "provenance": _jsonable(adapter.provenance)},
            "reference": {
                **(reference_info or {}),
                "tokens_fingerprint": ref_fp,
                "n_windows": int(tokens.shape[0]),
                "n_tokens": int(tokens.numel()),
            },
            "sites": sorted(stored),
        }
        _write_means(entry, stored, meta)
    info = {"path": str(entry / _MEANS_FILE), "key": key, "hit": not missing, "weights": model_fp}
    info["reference"] = meta["reference"]
    means = {s: stored[s].to(adapter.device) for s in sites}
    return means, info


_MEANS_FILE, _META_FILE = "means.safetensors", "meta.json"


def _read_means(entry: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The means and provenance of a cache entry; an entry missing or damaged in any part
    reads as empty (it is computed and written again)."""
    try:  # both files through one handle on the folder: one entry even if it is replaced
        folder = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return {}, {}
    try:
        means = load_tensors(_read_at(folder, _MEANS_FILE))
        meta = json.loads(_read_at(folder, _META_FILE))
        if isinstance(meta, dict) and isinstance(meta.get("reference"), dict):
            return means, meta
    except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed and rewritten
        pass
    finally:
        os.close(folder)
    return {}, {}


def _read_at(folder: int, name: str) -> bytes:
    with open(os.open(name, os.O_RDONLY, dir_fd=folder), "rb") as f:
        return f.read()


def _write_means(entry: Path, means: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write the entry whole in a temporary folder beside it, then rename it into place."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        save_file({k: v.contiguous() for k, v in means.items()}, str(tmp / _MEANS_FILE))
        write_json(tmp / _META_FILE, meta)
        replaced = tmp.with_name(f"{tmp.name}.replaced")
        with contextlib.suppress(FileNotFoundError):
            os.rename(entry, replaced)
        with contextlib.suppress(OSError):  # another process put its own whole entry there
            os.rename(tmp, entry)
        shutil.rmtree(replaced, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _compute_means(adapter, sites, tokens, batch_size) -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for start in range(0, len(tokens), batch_size):
        ids = tokens[start : start + batch_size].to(adapter.device)
        _, cache = adapter.run_with_cache(ids, sites)
        for site in sites:
            total = cache[site].double().sum(dim=(0, 1)).cpu()
            sums[site] = sums[site] + total if site in sums else total
        count += ids.numel()
    return {site: (total / count).float() for site, total in sums.items()}


# ------------------------------------------------------------------------- measures


def _token_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy per position (batch, pos - 1)."""
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(
        ids.shape[0], -1
    )


def _batches(n: int, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, n, batch_size):
        yield torch.arange(start, min(n, start + batch_size))


def _derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation with no fixed point: shuffle, then send each to the next."""
    order = rng.permutation(n)
    perm = np.empty(n, dtype=np.int64)
    perm[order] = np.roll(order, -1)
    return perm


def _examples(
    task: EncodedTask | None, windows: torch.Tensor | None
) -> list[tuple[np.ndarray, torch.Tensor, torch.Tensor | None]]:
    """Groups of equal-length examples: (example indices, ids, answers or None)."""
    if (task is None) == (windows is None):
        raise NnobsError("give either a task (logit difference) or corpus windows (loss)")
    if windows is not None:
        if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
            raise NnobsError("windows must be a (n, tokens) array with at least 2 tokens each")
        return [(np.arange(len(windows)), windows, None)]
    out = []
    for group in task.groups():
        ids = torch.tensor([task.clean[i] for i in group], dtype=torch.long)
        answers = torch.tensor([[task.correct[i], task.incorrect[i]] for i in group])
        out.append((np.asarray(group), ids, answers))
    return out


def _measure(adapter, ids, answers, edits) -> np.ndarray:
    """Per example: mean next-token loss (windows) or last-position logit difference."""
    logits, _ = adapter.run_with_cache(ids.to(adapter.device), [], edits=edits)
    if answers is None:
        return _token_losses(logits, ids.to(adapter.device)).mean(1).cpu().numpy()
    last = logits[:, -1].float().cpu()
    rows = torch.arange(len(last))
    return (last[rows, answers[:, 0]] - last[rows, answers[:, 1]]).numpy()


def change_summary(base: np.ndarray, new: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    """Mean before and after, and the mean per-example change with its bootstrap interval."""
    delta = new - base
    lo, hi = (
        stats.bootstrap_ci(np.mean, delta, n_boot=n_boot, seed=seed)
        if len(delta) > 1
        else (float("nan"), float("nan"))
    )
    return {
        "base": float(base.mean()),
        "ablated": float(new.mean()),
        "delta": float(delta.mean()),
        "delta_ci95": [lo, hi],
    }


@dataclass(frozen=True)
class AblationSettings:
    """Every choice an ablation or a direction test makes besides what it removes; stored in
    the result. ``seed``: resampling and the bootstrap; ``n_boot``: bootstrap resamples of
    each interval; ``batch_size``: rows per forward pass."""

    seed: int = 0
    n_boot: int = 1000
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise NnobsError(f"batch_size must be a positive integer, got {self.batch_size}")
        if self.n_boot < 1:
            raise NnobsError(f"n_boot must be a positive integer, got {self.n_boot}")


def ablate(
    adapter: ModelAdapter,
    target: Target,
    mode: str = "zero",
    settings: AblationSettings | None = None,
    *,
    task: EncodedTask | None = None,
    windows: torch.Tensor | np.ndarray | None = None,
    reference: torch.Tensor | np.ndarray | None = None,
    reference_info: dict | None = None,
    cache_dir: str | Path | None = None,
) -> dict:
    """Ablate ``target`` and measure the change, per example and on average.

    With ``task`` the measure is the logit difference on the clean prompts; with
    ``windows`` (token windows of a corpus) the mean next-token loss per window. ``mean``
    needs ``reference`` windows (the corpus the mean is taken over); ``resample`` draws
    each example's replacement from another example of the same length (a random
    derangement, seeded), dropping examples that have none. Returns a result document.
    """
    settings = settings or AblationSettings()
    if mode not in MODES:
        raise NnobsError(f"unknown ablation mode {mode!r}: choose one of {', '.join(MODES)}")
    if position_axis(target.site) != 1:
        raise NnobsError(f"{target.site!r} cannot be ablated by position: ablate head_out instead")
    windows_t = None if windows is None else torch.as_tensor(np.asarray(windows), dtype=torch.long)
    groups = _examples(task, windows_t)
    mean_info = None
    replacement: torch.Tensor | float = 0.0
    if mode == "mean":
        if reference is None:
            raise NnobsError("mean ablation needs reference windows to take the mean over")
        means, mean_info = mean_activations(
            adapter, [target.site], reference, reference_info=reference_info, cache_dir=cache_dir
        )
        replacement = means[target.site]
    measured = _ablated_examples(adapter, target, mode, groups, replacement, settings)
    result = _ablation_result(target, mode, task is not None, measured, settings)
    data = {"task": task.describe()} if task is not None else {"windows": windows_info(windows_t)}
    return result_document(
        adapter, "ablation", asdict(settings), **data, mean_cache=mean_info, ablation=result
    )


def _ablated_examples(
    adapter: ModelAdapter,
    target: Target,
    mode: str,
    groups: list,
    replacement: torch.Tensor | float,
    settings: AblationSettings,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Each example's measure before and after the ablation: (indices, base, ablated,
    examples dropped for want of another of the same length to resample from)."""
    rng = np.random.default_rng(settings.seed)
    index, base, new, dropped = [], [], [], 0
    for examples, ids, answers in groups:
        if mode == "resample" and len(examples) < 2:
            dropped += len(examples)
            continue
        source = _derangement(len(examples), rng) if mode == "resample" else None
        for rows in _batches(len(examples), settings.batch_size):
            a = None if answers is None else answers[rows]
            if source is not None:
                src_ids = ids[source[rows.numpy()]].to(adapter.device)
                _, cache = adapter.run_with_cache(src_ids, [target.site])
                replacement = cache[target.site]
            edit = replace_edit(target, replacement)
            base.append(_measure(adapter, ids[rows], a, {}))
            new.append(_measure(adapter, ids[rows], a, {target.site: edit}))
            index.append(examples[rows.numpy()])
    if not base:
        raise NnobsError(
            "resample ablation needs at least two examples of the same token length; "
            "use more items or windows"
        )
    return np.concatenate(index), np.concatenate(base), np.concatenate(new), dropped


def _ablation_result(
    target: Target,
    mode: str,
    on_task: bool,
    measured: tuple[np.ndarray, np.ndarray, np.ndarray, int],
    settings: AblationSettings,
) -> dict[str, Any]:
    index, base, new, dropped = measured
    result = {
        "measure": "logit_diff" if on_task else "loss",
        "target": target.describe(),
        "mode": mode,
        "n_examples": int(len(base)),
        "n_dropped": dropped,
        **change_summary(base, new, settings.n_boot, settings.seed),
        "per_example": {"index": index.tolist(), "base": base.tolist(), "ablated": new.tolist()},
    }
    if on_task:
        result["accuracy"] = {"base": float((base > 0).mean()), "ablated": float((new > 0).mean())}
    return result


def windows_info(windows: torch.Tensor | Windows) -> dict[str, Any]:
    """How many windows of how many tokens, and a fingerprint of the tokens the model read."""
    ids = windows.input_ids if isinstance(windows, Windows) else windows
    return {
        "n_windows": int(ids.shape[0]),
        "window": int(ids.shape[1]),
        "tokens_fingerprint": tokens_fingerprint(ids),
    }
