"""One forward pass per batch of token windows that collects everything the protocol reads.

:func:`capture` runs the model once per batch of windows (:mod:`nnobs.data.windows`: none
crosses a document boundary) and keeps, for every *valid* position (a real token whose next
token is real and in the same document), the next-token loss, output confidence and entropy,
and the activations and norms of the requested hook sites. Padding never enters a statistic.

With ``directory`` set, per-token arrays are streamed front to back into ``.npy`` files
(sequential writes, so process memory stays flat whatever the token budget) and come back
as read-only memory maps; the layout is::

    capture.json                 sites, token count, stats
    loss.npy max_softmax.npy entropy.npy doc_ids.npy
    acts/<site>.npy              (n, d) activations, float16 by default
    norms/<site>.npy             (n,) float32 L2 norms (computed before any down-cast)
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
import torch
from tqdm import tqdm

from nnobs.core.errors import NnobsError
from nnobs.core.files import atomic_path, read_json, write_json
from nnobs.core.lock import ScratchDir
from nnobs.data.corpus import default_cache_dir
from nnobs.data.windows import Windows, attention_mask
from nnobs.models.adapter import Edit, ModelAdapter
from nnobs.models.load import NONFINITE_WEIGHTS, nonfinite_weight
from nnobs.models.sites import SITE_KINDS, site_kind

FORMAT = "nnobs.capture"
FORMAT_VERSION = 1
SCALARS = ("loss", "max_softmax", "entropy")
FLOAT16_MAX = float(np.finfo(np.float16).max)


def capture_scratch(prefix: str) -> ScratchDir:
    """A working folder for disk-backed captures in ``CACHE/scratch/`` (see
    :func:`~nnobs.data.corpus.default_cache_dir`), deleted on close. A process killed before
    it could clean up leaves its folder behind; the next one created removes it."""
    return ScratchDir(default_cache_dir() / "scratch", prefix)


@dataclass
class Capture:
    """Per-token results of :func:`capture`, one row per valid position."""

    loss: np.ndarray  # (n,) float32 next-token cross-entropy (nats)
    max_softmax: np.ndarray  # (n,) float32 largest output probability
    entropy: np.ndarray  # (n,) float32 output entropy (nats)
    doc_ids: np.ndarray  # (n,) int64 source document of each token
    acts: dict[str, np.ndarray]  # site -> (n, d) activations
    norms: dict[str, np.ndarray]  # site -> (n,) float32 L2 norms
    stats: dict[str, Any]

    def _files(self) -> dict[str, np.ndarray]:
        files = {f"{name}.npy": getattr(self, name) for name in (*SCALARS, "doc_ids")}
        files.update({f"acts/{site}.npy": a for site, a in self.acts.items()})
        files.update({f"norms/{site}.npy": a for site, a in self.norms.items()})
        return files

    def save(self, directory: str | os.PathLike) -> None:
        """Write every array as ``.npy`` plus ``capture.json`` (written last)."""
        directory = Path(directory)
        for name, array in self._files().items():
            path = directory / name
            if isinstance(array, np.memmap) and Path(array.filename).resolve() == path.resolve():
                continue  # already streamed there by capture()
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.save(f, np.asarray(array), allow_pickle=False)
        _write_meta(directory, len(self.loss), list(self.acts), self.stats)

    @classmethod
    def load(cls, directory: str | os.PathLike, mmap: bool = True) -> Capture:
        """Read a saved capture; activations stay on disk as read-only memory maps."""
        directory = Path(directory)
        meta = read_json(directory / "capture.json", "capture")
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise NnobsError(f"{directory} does not hold an nnobs capture of version 1")
        n, sites = int(meta["tokens"]), list(meta["sites"])

        def read(name: str, big: bool = False) -> np.ndarray:
            path = directory / name
            try:
                array = np.load(path, mmap_mode="r" if big and mmap else None, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise NnobsError(f"capture file {path} is missing or damaged: {e}") from None
            if len(array) != n:
                raise NnobsError(f"capture file {path} has {len(array)} rows, expected {n}")
            return array

        return cls(
            **{name: read(f"{name}.npy") for name in (*SCALARS, "doc_ids")},
            acts={s: read(f"acts/{s}.npy", big=True) for s in sites},
            norms={s: read(f"norms/{s}.npy") for s in sites},
            stats=meta["stats"],
        )


def _write_meta(directory: Path, n: int, sites: list[str], stats: dict[str, Any]) -> None:
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "tokens": n, "sites": sites}
    write_json(directory / "capture.json", {**meta, "stats": stats})


class _Column:
    """One per-token array filled front to back: in RAM, or streamed into a ``.npy`` file."""

    def __init__(
        self, n: int, tail: tuple[int, ...], dtype: npt.DTypeLike, file: BinaryIO | None
    ) -> None:
        self.shape, self.dtype, self.file, self.filled = (n, *tail), np.dtype(dtype), file, 0
        if file is None:
            self.array = np.empty(self.shape, self.dtype)
        else:
            header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False}
            np.lib.format.write_array_header_1_0(file, {**header, "shape": self.shape})

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if self.file is None:
            self.array[self.filled : self.filled + len(rows)] = rows
        else:
            self.file.write(rows.data)
        self.filled += len(rows)


class _Columns:
    """Creates columns in RAM or, under ``directory``, as files renamed into place on success."""

    def __init__(self, n: int, directory: Path | None, stack: ExitStack) -> None:
        self.n, self.directory, self.stack = n, directory, stack
        self.columns: dict[str, _Column] = {}

    def add(self, name: str, tail: tuple[int, ...], dtype: npt.DTypeLike) -> _Column:
        file = None
        if self.directory is not None:
            tmp = self.stack.enter_context(atomic_path(self.directory / f"{name}.npy"))
            file = self.stack.enter_context(open(tmp, "wb"))  # noqa: SIM115 (stack closes it)
        self.columns[name] = _Column(self.n, tail, dtype, file)
        return self.columns[name]

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: c.array for name, c in self.columns.items()}


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _check_windows(windows: Windows, vocab_size: int) -> None:
    shape = windows.input_ids.shape
    if windows.targets.shape != shape or windows.valid.shape != shape or len(shape) != 2:
        raise NnobsError("windows are inconsistent: input_ids, targets and valid differ in shape")
    if len(windows.doc_ids) != shape[0]:
        raise NnobsError("windows are inconsistent: one doc_id is needed per window")
    if windows.n_tokens == 0:
        raise NnobsError("no valid token positions to capture: the windows are all padding")
    used = np.concatenate([windows.input_ids[windows.valid], windows.targets[windows.valid]])
    low, high = int(used.min()), int(used.max())
    if low < 0 or high >= vocab_size:
        raise NnobsError(
            f"token id {high if high >= vocab_size else low} is outside the model's vocabulary "
            f"of {vocab_size}: the tokenizer does not match the model"
        )


def _output_stats(
    rows: torch.Tensor,
    targets: torch.Tensor,
    keep: torch.Tensor | None,
    to_logits: Callable[[torch.Tensor], torch.Tensor] | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """(3, k) float32 rows: loss, max softmax and entropy of the kept positions.

    ``rows`` is (positions, vocab) logits, or with ``to_logits`` (positions, d) final
    residual-stream rows that it maps to logits; ``keep`` the indices of valid positions (None:
    all). Work goes in row chunks: on CPU each chunk's passes then stay in cache (several times
    faster than whole-batch passes), on GPU the float32 copy stays bounded for any vocab, and
    with ``to_logits`` no (positions, vocab) tensor is ever allocated.
    """
    if keep is not None and 2 * len(keep) >= len(rows):
        # Mostly valid: computing the few padded rows too is cheaper than gathering the rest.
        return _output_stats(rows, targets, None, to_logits, vocab_size)[:, keep]
    n = rows.shape[0] if keep is None else len(keep)
    vocab = rows.shape[-1] if to_logits is None else vocab_size
    step = max(1, (2**19 if rows.device.type == "cpu" else 2**26) // vocab)
    if to_logits is not None:  # each chunk re-reads the (d × vocab) unembedding: amortise it
        step = max(step, rows.shape[-1])
    out = torch.empty(3, n, device=rows.device)
    for first in range(0, n, step):
        part = slice(first, first + step)
        z = rows[part] if keep is None else rows.index_select(0, keep[part])
        z = (z if to_logits is None else to_logits(z)).float()
        target = targets[part] if keep is None else targets.index_select(0, keep[part])
        p = torch.softmax(z, dim=-1)
        top = p.amax(dim=-1)
        lse = z.amax(dim=-1) - top.log()  # the top token's probability is exp(max z − lse)
        pz = torch.linalg.vecdot(p, z)
        if not torch.isfinite(pz).all():  # 0 × −inf from masked vocabulary entries
            pz = torch.where(p > 0, p * z, 0.0).sum(dim=-1)
        out[0, part] = lse - z.gather(1, target[:, None]).squeeze(1)
        out[1, part] = top
        out[2, part] = lse - pz  # H = −Σ p log p = lse − Σ p z
    return out


def _site_rows(
    name: str, value: torch.Tensor, batch: tuple[int, int], keep: torch.Tensor | None
) -> torch.Tensor:
    if tuple(value.shape[:2]) != batch:
        raise NnobsError(
            f"site {name} has shape {tuple(value.shape)}, not (batch, pos, ...): only "
            "per-token sites can be captured"
        )
    rows = value.flatten(0, 1)
    return (rows if keep is None else rows[keep]).flatten(1)


class _NonFinite(NnobsError):
    """Non-finite ``values`` met ``where`` in the model; :func:`capture` adds the cause."""

    def __init__(self, values: str, where: str) -> None:
        super().__init__(f"{values} {where}")
        self.values, self.where = values, where


def _nonfinite_cause(adapter: ModelAdapter, where: str) -> str:
    """Why a forward pass gave non-finite values, as advice: broken weights are no precision
    problem, and only a model in half precision can be helped by float32."""
    weight = nonfinite_weight(adapter.model)
    if weight is not None:
        return f"{NONFINITE_WEIGHTS}: {weight}"
    half = any(p.dtype in (torch.float16, torch.bfloat16) for p in adapter.model.parameters())
    return f"the model is numerically broken {where}" + (" — try float32" if half else "")


def _row_norms(site: str, rows: torch.Tensor, store: torch.dtype) -> torch.Tensor:
    """Each row's float32 L2 norm, after checking the rows are finite and fit ``store``."""
    norm = rows.float().norm(dim=1)
    # One scalar answers both checks: a row's norm bounds its every entry.
    worst = float(norm.max()) if len(norm) else 0.0
    if not np.isfinite(worst):
        bad = int((~torch.isfinite(rows)).sum())
        raise _NonFinite(f"{site} has {bad} non-finite values", "at this layer")
    if store == torch.float16 and worst > FLOAT16_MAX:
        peak = float(rows.float().abs().max())
        if peak > FLOAT16_MAX:
            raise NnobsError(
                f"{site} has values up to {peak:.3g}, beyond float16's range "
                f"({FLOAT16_MAX:.0f}); capture with dtype float32"
            )
    return norm


def _check_request(
    adapter: ModelAdapter, sites: list[str], dtype: np.dtype, batch_size: int
) -> None:
    for site in sites:
        adapter.resolve(site)
        kind = SITE_KINDS[site_kind(site)]
        if not kind.per_token:
            raise NnobsError(
                f"{site} is ({' × '.join(kind.axes[1:])}) per sequence, not a per-token "
                "activation; read it with adapter.run_with_cache"
            )
    if dtype not in (np.float16, np.float32):
        raise NnobsError(f"activations are stored as float16 or float32, not {dtype}")
    if batch_size < 1:
        raise NnobsError(f"batch_size must be a positive integer, got {batch_size}")


class _Writer:
    """The capture's columns, filled one batch of valid positions at a time."""

    def __init__(
        self, columns: _Columns, windows: Windows, sites: list[str], dtype: np.dtype
    ) -> None:
        self.columns, self.sites, self.dtype = columns, sites, dtype
        self.store = torch.float16 if dtype == np.float16 else torch.float32
        self.scalars = {name: columns.add(name, (), np.float32) for name in SCALARS}
        columns.add("doc_ids", (), np.int64).write(windows.row_documents())
        self.norms = {site: columns.add(f"norms/{site}", (), np.float32) for site in sites}
        self.acts: dict[str, _Column] = {}  # created at the first batch, which gives the width

    def write(
        self,
        out: torch.Tensor,
        cache: dict[str, torch.Tensor],
        shape: tuple[int, int],
        keep: torch.Tensor | None,
    ) -> None:
        """One batch: ``out`` from :func:`_output_stats`, ``cache`` the hooked site values."""
        for site in self.sites:
            rows = _site_rows(site, cache[site], shape, keep)
            norm = _row_norms(site, rows, self.store)
            if site not in self.acts:
                self.acts[site] = self.columns.add(f"acts/{site}", (rows.shape[1],), self.dtype)
            self.acts[site].write(rows.to(self.store).cpu().numpy())
            self.norms[site].write(norm.cpu().numpy())
        # Checked after the sites, so a broken layer is named before its effect.
        bad = int((~torch.isfinite(out[0])).sum())
        if bad:
            raise _NonFinite(f"the loss has {bad} non-finite values", "at its output")
        for name, row in zip(SCALARS, out.cpu().numpy(), strict=True):
            self.scalars[name].write(row)


def _capture_batch(
    adapter: ModelAdapter,
    windows: Windows,
    batch: slice,
    writer: _Writer,
    edits: Mapping[str, Edit] | None,
    fused: bool,
) -> None:
    """One forward pass over a batch of windows, its valid positions written to ``writer``."""
    device = adapter.device
    valid_np = windows.valid[batch]
    ids = torch.from_numpy(windows.input_ids[batch]).to(device)
    valid = torch.from_numpy(valid_np).to(device)
    # The mask attends to a leading BOS too, whose own row is not scored.
    attended = torch.from_numpy(attention_mask(valid_np)).to(device).long()
    targets = torch.from_numpy(windows.targets[batch]).to(device).flatten()
    with torch.inference_mode(), adapter.hooks(capture=writer.sites, edits=edits) as cache:
        # Full windows (the common case) need no gather: every position is kept.
        keep = None if valid_np.all() else valid.flatten().nonzero().squeeze(1)
        if fused:
            stream = adapter.stream_fn(ids, attended).flatten(0, 1)
            out = _output_stats(stream, targets, keep, adapter.unembed_fn, adapter.vocab_size)
        else:
            logits = adapter.forward(ids, attended).flatten(0, 1)
            out = _output_stats(logits, targets, keep)
        writer.write(out, cache, tuple(ids.shape), keep)


def capture(
    adapter: ModelAdapter,
    windows: Windows,
    sites: list[str],
    *,
    batch_size: int = 16,
    dtype: npt.DTypeLike = np.float16,
    directory: str | os.PathLike | None = None,
    progress: bool = True,
    desc: str = "capture",
    edits: Mapping[str, Edit] | None = None,
) -> Capture:
    """One forward pass per batch of windows: output statistics and site activations.

    Activations are stored as ``dtype`` (float16 or float32); norms are computed in float32
    before the cast. With ``directory``, arrays are streamed to disk and the result's
    activations are read-only memory maps of those files. ``edits`` (site -> edit, see
    :meth:`ModelAdapter.hooks`) change the forward pass; a captured site records its value
    after the edit.
    """
    sites = list(dict.fromkeys(sites))
    dtype = np.dtype(dtype)
    _check_request(adapter, sites, dtype, batch_size)
    _check_windows(windows, adapter.vocab_size)
    out_dir = Path(directory) if directory is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "capture.json").unlink(missing_ok=True)  # no stale capture while writing

    n, n_windows = windows.n_tokens, len(windows.input_ids)
    # Logits a few rows at a time from the final stream, unless a site inside the readout is
    # wanted or edited (its hook would then see one chunk at a time).
    readout_hooked = "final" in sites or "final" in (edits or {})
    fused = adapter.stream_fn is not None and adapter.unembed_fn is not None and not readout_hooked
    start = time.perf_counter()
    with ExitStack() as stack:
        columns = _Columns(n, out_dir, stack)
        writer = _Writer(columns, windows, sites, dtype)
        bar = stack.enter_context(
            tqdm(total=n_windows, desc=desc, unit="window", disable=not progress, leave=False)
        )
        try:
            for first in range(0, n_windows, batch_size):
                batch = slice(first, first + batch_size)
                _capture_batch(adapter, windows, batch, writer, edits, fused)
                bar.update(len(windows.valid[batch]))
        except _NonFinite as e:
            raise NnobsError(f"{e.values}; {_nonfinite_cause(adapter, e.where)}") from e
        seconds = time.perf_counter() - start
    stats = {
        "tokens": n,
        "windows": n_windows,
        "seq_len": windows.seq_len,
        "batch_size": batch_size,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(n / seconds, 1) if seconds > 0 else None,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "bytes_on_disk": 0,
        "dtype": dtype.name,
        "sites": sites,
        "device": str(adapter.device),
    }
    return _finish(columns, out_dir, sites, stats)


def _finish(
    columns: _Columns, out_dir: Path | None, sites: list[str], stats: dict[str, Any]
) -> Capture:
    """The capture from the filled columns: arrays in RAM, or the files under ``out_dir``
    (their metadata written last, so a partial capture never looks complete)."""
    if out_dir is None:
        arrays = columns.arrays()
        return Capture(
            **{name: arrays[name] for name in (*SCALARS, "doc_ids")},
            acts={s: arrays[f"acts/{s}"] for s in sites},
            norms={s: arrays[f"norms/{s}"] for s in sites},
            stats=stats,
        )
    stats["bytes_on_disk"] = sum(
        (out_dir / f"{name}.npy").stat().st_size for name in columns.columns
    )
    _write_meta(out_dir, stats["tokens"], sites, stats)
    return Capture.load(out_dir)
