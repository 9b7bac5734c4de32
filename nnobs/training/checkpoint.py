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
only a ``.tmp-*`` directory, which the next run removes. See :mod:`nnobs.core.rundir` for the
rest of the run directory.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from nnobs.core.errors import NnobsError, first_line
from nnobs.core.files import read_json, write_json
from nnobs.core.rundir import CHECKPOINT_FORMAT, RunDir
from nnobs.core.version import __version__
from nnobs.models.checkpoint import load_safetensors
from nnobs.models.config import ModelConfig

_TMP_PREFIX = ".tmp-"
# What restoring an edited state file raises (shapes, types, missing or extra entries).
_DAMAGE = (LookupError, ValueError, TypeError, AttributeError, RuntimeError, OverflowError)

# ------------------------------------------------------------------ optimizer and RNG state


def remove_partial(run_dir: str | os.PathLike) -> None:
    """Delete temporary checkpoint directories left by a run killed while saving."""
    root = RunDir(run_dir).checkpoints_dir
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith(_TMP_PREFIX) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)


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
    """Load the per-parameter state :func:`optimizer_state` saved into ``optimizer``.

    The optimizer keeps its own hyperparameters: they come from the run's train config, which
    a resumed run shares. State that does not fit its parameters raises ValueError (checked
    here: the optimizer itself would fail only at its next step, or not at all).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_groups = [len(g["params"]) for g in info["param_groups"]]
    if saved_groups != [len(g["params"]) for g in optimizer.param_groups]:
        raise ValueError(f"its parameter groups hold {saved_groups} parameters")
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, _, key = name.partition(".")
        state.setdefault(_param_index(index, len(params)), {})[key] = value
    for index, values in info["scalars"].items():
        state.setdefault(_param_index(index, len(params)), {}).update(values)
    _check_state(optimizer, params, state)
    optimizer.load_state_dict(
        {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}
    )


def _check_state(
    optimizer: torch.optim.Optimizer, params: list[torch.Tensor], state: dict[int, dict]
) -> None:
    """Each parameter's state has what the optimizer reads, as float tensors of its shape."""
    # What Adam and AdamW read at every step. A parameter without state (one that never had a
    # gradient) is fine: the optimizer starts it afresh.
    required = {"step", "exp_avg", "exp_avg_sq"}
    adam = isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW)
    for index, values in state.items():
        if adam and required - set(values):
            raise ValueError(f"parameter {index} lacks {', '.join(sorted(required - set(values)))}")
        for key, value in values.items():
            if not isinstance(value, torch.Tensor):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(f"parameter {index}'s {key} is {value!r}, not a number")
                continue
            shape = () if key == "step" else tuple(params[index].shape)
            if not value.is_floating_point() or tuple(value.shape) != shape:
                raise ValueError(
                    f"parameter {index}'s {key} is a {value.dtype} tensor of shape "
                    f"{tuple(value.shape)}, not a float one of shape {shape}"
                )


def _param_index(text: str, n_params: int) -> int:
    if not text.isdigit() or int(text) >= n_params:
        raise ValueError(f"its entry {text!r} names none of the {n_params} parameters")
    return int(text)


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
    if gauss_next is not None and not isinstance(gauss_next, float):
        raise ValueError(f"Python's gauss_next is {gauss_next!r}, not a float")  # never checked
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
    unwrapped :class:`~nnobs.models.transformer.Transformer` (not a DDP wrapper).
    """
    final = RunDir(run_dir).checkpoint_dir(step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
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


def damaged(ckpt: Path, problem: str) -> NnobsError:
    """The error for a checkpoint a run cannot resume from, and how to resume without it."""
    return NnobsError(
        f"checkpoint {str(ckpt)!r} is damaged: {problem}; delete it to resume from the "
        "checkpoint before it"
    )


def load_training_state(ckpt: Path, optimizer: torch.optim.Optimizer) -> None:
    """Restore the optimizer and the global RNGs saved with a checkpoint; a missing, damaged
    or edited state file is one NnobsError (:func:`damaged`)."""
    for name, what, restore in (
        ("optimizer", "optimizer state", lambda t, i: restore_optimizer(optimizer, t, i)),
        ("rng", "RNG state", restore_rng),
    ):
        try:
            info = read_json(ckpt / f"{name}.json", what)
            restore(load_safetensors(ckpt / f"{name}.safetensors", what), info)
        except NnobsError as e:
            raise damaged(ckpt, str(e)) from e
        except _DAMAGE as e:
            reason = f"{e.args[0]!r} is missing" if isinstance(e, KeyError) else first_line(e)
            files = f"{name}.json, {name}.safetensors"
            raise damaged(ckpt, f"its {what} ({files}) does not fit ({reason})") from e
