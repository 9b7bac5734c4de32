"""Checkpoints of nnobs runs: written atomically, read back without unpickling anything.

A checkpoint is the directory ``<run>/checkpoints/step_NNNNNN/`` holding

- ``model.safetensors``: the weights (tied embeddings stored once),
- ``optimizer.safetensors`` + ``optimizer.json``: AdamW's per-parameter tensors, and its
  scalars and parameter-group hyperparameters as JSON,
- ``rng.safetensors`` + ``rng.json``: torch's generator states as tensors, numpy's and
  Python's as JSON,
- ``meta.json``: step, model config and its hash, tokenizer reference, tokens seen,
  validation loss, corpus, nnobs version, time.

It is assembled in a hidden temporary directory beside its final place and renamed into
place, so a directory named ``step_*`` is always complete: a run killed while saving leaves
only a ``.tmp-*`` directory, which the next run removes. See :mod:`nnobs.train` for the
rest of the run directory.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from nnobs import __version__
from nnobs.atomic import write_json
from nnobs.config import ModelConfig
from nnobs.errors import NnobsError

CHECKPOINT_FORMAT = "nnobs-checkpoint/1"
RUN_FORMAT = "nnobs-run/1"
_STEP_DIR = re.compile(r"step_(\d+)")
_TMP_PREFIX = ".tmp-"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; missing, unreadable or malformed → one-line NnobsError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise NnobsError(f"{what} {str(path)!r} is missing") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NnobsError(f"{what} {str(path)!r} is unreadable or corrupt ({e})") from e
    if not isinstance(data, dict):
        raise NnobsError(f"{what} {str(path)!r} is corrupt: expected a JSON object")
    return data


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, ``(step, path)`` sorted by step."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.fullmatch(entry.name)
        if match and (entry / "meta.json").is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def is_nnobs_path(path: str | os.PathLike) -> bool:
    """True for an nnobs run directory or checkpoint directory (complete or damaged).

    A damaged checkpoint of ours still counts, so loading it reports what is wrong with it
    instead of trying it as some other kind of model.
    """
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / "run.json").is_file() or (path / "meta.json").is_file():
        return True
    return bool(_STEP_DIR.fullmatch(path.name)) and path.parent.name == "checkpoints"


def remove_partial(run_dir: str | os.PathLike) -> None:
    """Delete temporary checkpoint directories left by a run killed while saving."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith(_TMP_PREFIX) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)


# ------------------------------------------------------------------ optimizer and RNG state


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state dict split into tensors (for safetensors) and JSON."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, values in info["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
        for g in info["param_groups"]
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every global RNG's state: torch's as tensors, numpy's and Python's as JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return tensors, {
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "python": [version, list(internal), gauss_next],
    }


def restore_rng(tensors: dict[str, torch.Tensor], info: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = info["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ------------------------------------------------------------------------------- saving


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write ``<run_dir>/checkpoints/step_<step>/`` atomically; return its path.

    ``meta`` gets the format marker, step, config and version added; the model must be an
    unwrapped :class:`~nnobs.model.Transformer` (not a DDP wrapper).
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{final.name}-", dir=root))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a checkpoint is not
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
        if optimizer is not None:
            tensors, info = optimizer_state(optimizer)
            safetensors.torch.save_file(tensors, str(tmp / "optimizer.safetensors"))
            write_json(tmp / "optimizer.json", info)
        tensors, info = rng_state()
        safetensors.torch.save_file(tensors, str(tmp / "rng.safetensors"))
        write_json(tmp / "rng.json", info)
        config: ModelConfig = model.config
        full_meta = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "config": config.to_dict(),
            "config_hash": config.hash,
            "nnobs_version": __version__,
            **meta,
        }
        write_json(tmp / "meta.json", full_meta)  # last: its presence marks completeness
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ------------------------------------------------------------------------------ loading


@dataclass
class LoadedCheckpoint:
    model: nn.Module
    config: ModelConfig
    tokenizer: Any
    meta: dict[str, Any]
    path: Path

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def provenance(self) -> dict[str, Any]:
        """What every result computed from this checkpoint records about its model."""
        corpus = self.meta.get("corpus") or {}
        return {
            "path": str(self.path.resolve()),
            "step": self.step,
            "config_hash": self.meta.get("config_hash", self.config.hash),
            "tokens_seen": self.meta.get("tokens_seen"),
            "nnobs_version": self.meta.get("nnobs_version"),
            "corpus_fingerprint": corpus.get("fingerprint"),
            "corpus_spec": corpus.get("spec"),
        }


def resolve_checkpoint(path: str | os.PathLike, step: int | None = None) -> Path:
    """The checkpoint directory meant by a run directory (latest, or ``step``) or itself."""
    path = Path(path)
    if not path.exists():
        raise NnobsError(f"{str(path)!r} does not exist: give an nnobs run or checkpoint directory")
    if (path / "run.json").is_file() or (path / "checkpoints").is_dir():
        found = list_checkpoints(path)
        if not found:
            raise NnobsError(
                f"run {str(path)!r} has no complete checkpoint yet: train it (nnobs train) first"
            )
        if step is None:
            return found[-1][1]
        for s, p in found:
            if s == step:
                return p
        steps = ", ".join(str(s) for s, _ in found)
        raise NnobsError(f"run {str(path)!r} has no checkpoint at step {step}: it has {steps}")
    if not is_nnobs_path(path):
        raise NnobsError(
            f"{str(path)!r} is not an nnobs run or checkpoint directory "
            "(no run.json or meta.json in it)"
        )
    if not (path / "meta.json").is_file():
        raise NnobsError(
            f"checkpoint {str(path)!r} is incomplete or damaged: meta.json is missing; "
            "delete it and resume the run to rewrite it"
        )
    return path


def read_meta(ckpt: Path) -> dict[str, Any]:
    meta = read_json(ckpt / "meta.json", "checkpoint metadata")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise NnobsError(
            f"{str(ckpt)!r} is not an nnobs checkpoint (meta.json has format "
            f"{meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r})"
        )
    return meta


def _load_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path))
    except FileNotFoundError as e:
        raise NnobsError(f"checkpoint {str(path.parent)!r} has no {path.name}") from e
    except Exception as e:  # safetensors raises its own error type for any damaged file
        raise NnobsError(f"{what} {str(path)!r} is corrupt ({_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_weights(model: nn.Module, ckpt: Path) -> None:
    """Fill ``model`` from ``ckpt/model.safetensors``; damage or mismatch → NnobsError."""
    file = ckpt / "model.safetensors"
    if not file.is_file():
        raise NnobsError(f"checkpoint {str(ckpt)!r} is damaged: model.safetensors is missing")
    try:
        safetensors.torch.load_model(model, str(file), strict=True)
    except Exception as e:
        raise NnobsError(
            f"weights {str(file)!r} are corrupt or do not match the checkpoint's config "
            f"({_first_line(e)})"
        ) from e


def load_training_state(ckpt: Path, optimizer: torch.optim.Optimizer) -> None:
    """Restore the optimizer and the global RNGs saved with a checkpoint."""
    info = read_json(ckpt / "optimizer.json", "optimizer state")
    tensors = _load_safetensors(ckpt / "optimizer.safetensors", "optimizer state")
    try:
        restore_optimizer(optimizer, tensors, info)
    except (KeyError, ValueError, TypeError) as e:
        raise NnobsError(
            f"optimizer state in {str(ckpt)!r} does not fit the model ({_first_line(e)})"
        ) from e
    rng_info = read_json(ckpt / "rng.json", "RNG state")
    restore_rng(_load_safetensors(ckpt / "rng.safetensors", "RNG state"), rng_info)


def _load_run_tokenizer(ckpt: Path, reference: dict | None) -> Any:
    """The checkpoint's tokenizer, preferring the copy in its run directory (runs can move)."""
    from nnobs.tokenizer import load_tokenizer

    if not reference:
        return None
    reference = dict(reference)
    run_copy = ckpt.parent.parent / "tokenizer.json"
    if reference.get("kind") == "bpe" and run_copy.is_file():
        reference["path"] = str(run_copy)
    return load_tokenizer(reference)


def load_checkpoint(path: str | os.PathLike, step: int | None = None) -> LoadedCheckpoint:
    """Load a checkpoint (or a run's latest, or its checkpoint at ``step``) on the CPU."""
    from nnobs.model import Transformer

    ckpt = resolve_checkpoint(path, step)
    meta = read_meta(ckpt)
    if step is not None and meta.get("step") != step:
        raise NnobsError(f"checkpoint {str(ckpt)!r} is step {meta.get('step')}, not {step}")
    try:
        config = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError) as e:
        raise NnobsError(
            f"checkpoint {str(ckpt)!r} is corrupt: meta.json has no valid model config"
        ) from e
    model = Transformer(config)
    load_weights(model, ckpt)
    tokenizer = _load_run_tokenizer(ckpt, meta.get("tokenizer"))
    return LoadedCheckpoint(model.eval(), config, tokenizer, meta, ckpt)
