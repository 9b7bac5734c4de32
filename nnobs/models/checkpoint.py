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
from nnobs.core.rundir import read_meta, resolve_checkpoint
from nnobs.models.config import ModelConfig


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


def load_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
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


def _load_run_tokenizer(ckpt: Path, reference: dict | None) -> Any:
    """The checkpoint's tokenizer, preferring the copy in its run directory (runs can move)."""
    from nnobs.data.tokenizer import load_tokenizer

    if not reference:
        return None
    reference = dict(reference)
    run_copy = ckpt.parent.parent / "tokenizer.json"
    if reference.get("kind") == "bpe" and run_copy.is_file():
        reference["path"] = str(run_copy)
    return load_tokenizer(reference)


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
    tokenizer = _load_run_tokenizer(ckpt, meta.get("tokenizer"))
    return LoadedCheckpoint(model.eval(), config, tokenizer, meta, ckpt)
