"""Reading a checkpoint back as a model: weights, config and tokenizer, no unpickling."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from nnobs.core.errors import NnobsError, first_line
from nnobs.core.rundir import RunDir, read_meta, resolve_checkpoint
from nnobs.models.config import ModelConfig


@dataclass
class LoadedCheckpoint:
    """A checkpoint read back: the model (in eval mode, on the CPU), its config, tokenizer
    and metadata, and where it was read from."""

    model: nn.Module
    config: ModelConfig
    tokenizer: Any
    meta: dict[str, Any]
    path: Path

    @property
    def step(self) -> int:
        """The training step the checkpoint was saved at."""
        return int(self.meta["step"])

    def provenance(self) -> dict[str, Any]:
        """What every result computed from this checkpoint records about its model."""
        return checkpoint_provenance(self.path, self.meta, self.config.hash)


def checkpoint_provenance(
    path: Path, meta: dict[str, Any], config_hash: str | None = None
) -> dict[str, Any]:
    """The provenance of a checkpoint at ``path`` from its metadata (``config_hash`` where the
    metadata has none)."""
    corpus = meta.get("corpus") or {}
    return {
        "path": str(path.resolve()),
        "step": int(meta["step"]),
        "config_hash": meta.get("config_hash", config_hash),
        "tokens_seen": meta.get("tokens_seen"),
        "nnobs_version": meta.get("nnobs_version"),
        "corpus_fingerprint": corpus.get("fingerprint"),
        "corpus_spec": corpus.get("spec"),
    }


def load_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors in a safetensors file; missing or damaged → NnobsError naming ``what``."""
    try:
        return safetensors.torch.load_file(str(path))
    except FileNotFoundError as e:
        raise NnobsError(f"checkpoint {str(path.parent)!r} has no {path.name}") from e
    except Exception as e:  # safetensors raises its own error type for any damaged file
        raise NnobsError(f"{what} {str(path)!r} is corrupt ({first_line(e)})") from e


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
            f"({first_line(e)})"
        ) from e


def load_run_tokenizer(run_dir: RunDir, reference: dict[str, Any] | None) -> Any:
    """The tokenizer a run recorded (``reference``), read from the run's own copy if it has
    one; None without a reference."""
    from nnobs.data.tokenizer import load_tokenizer

    if not reference:
        return None
    return load_tokenizer(run_dir.tokenizer_reference(reference))


def load_checkpoint(path: str | os.PathLike, step: int | None = None) -> LoadedCheckpoint:
    """Load a checkpoint (or a run's latest, or its checkpoint at ``step``) on the CPU."""
    from nnobs.models.transformer import Transformer

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
    tokenizer = load_run_tokenizer(RunDir.of_checkpoint(ckpt), meta.get("tokenizer"))
    return LoadedCheckpoint(model.eval(), config, tokenizer, meta, ckpt)
