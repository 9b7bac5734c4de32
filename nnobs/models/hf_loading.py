"""Reading a Hugging Face causal LM's config and tokenizer, and checking it is one nnobs reads."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from nnobs.core.errors import NnobsError, first_line

_REPO_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def load_config(spec: str, revision: str | None, trust_remote_code: bool) -> tuple[Any, str]:
    """The model's config, and the source it loads from (a local directory or a hub name)."""
    from transformers import AutoConfig

    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise NnobsError(
                f"{spec} has no config.json: it is not a saved Hugging Face model "
                "(write one with model.save_pretrained)"
            )
        source = str(path)
    elif not _REPO_ID.fullmatch(spec):
        raise NnobsError(f"no such model directory: {spec}")
    else:
        source = spec
    try:
        return AutoConfig.from_pretrained(
            source, revision=revision, trust_remote_code=trust_remote_code
        ), source
    except (OSError, ValueError) as e:
        offline = "connect" in str(e) or "offline" in str(e).lower()
        if source == spec and offline:
            raise NnobsError(
                f"model {spec!r} could not be found locally (not a directory, not in the "
                "Hugging Face cache) and there is no network; pass the path of a model "
                "saved with save_pretrained"
            ) from None
        raise NnobsError(f"cannot load a model config from {spec!r}: {first_line(e)}") from None


def check_safetensors(source: str, spec: str) -> None:
    """Refuse a local model whose weights are only PyTorch pickles (``pytorch_model.bin``):
    unpickling an untrusted file runs its code, so nnobs reads safetensors only."""
    path = Path(source)
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if pickles:
        raise NnobsError(
            f"{spec} holds only pickled PyTorch weights ({pickles[0]}) and nnobs loads "
            "safetensors only (unpickling can run code); if you trust the file, convert it: "
            f"load the model with transformers yourself and call "
            f"model.save_pretrained({spec!r}, safe_serialization=True)"
        )


def check_causal_lm(config: Any, spec: str) -> None:
    """Refuse, with the reason, a config that is not a decoder-only causal LM."""
    from transformers.models.auto import modeling_auto

    name = type(config).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise NnobsError(
            f"{spec} is not a causal language model ({name} is an encoder-decoder); "
            "nnobs reads decoder-only causal LMs"
        )
    if type(config) not in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise NnobsError(
            f"{spec} is not a causal language model ({name} has no causal-LM head in "
            "transformers); nnobs reads decoder-only causal LMs"
        )
    # Encoders such as BERT also have a causal-LM class, usable only when configured as a
    # decoder; an encoder config is not a causal LM.
    if type(config) in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING and not getattr(
        config, "is_decoder", True
    ):
        raise NnobsError(
            f"{spec} is not a causal language model ({name} is an encoder / masked LM); "
            "nnobs reads decoder-only causal LMs"
        )


def torch_dtype(dtype: torch.dtype | str | None, device: str | torch.device) -> Any:
    """None means float32 on CPU (fast and exact there) and the checkpoint's dtype elsewhere."""
    if dtype is None:
        on_cpu = str(device) != "auto" and torch.device(device).type == "cpu"
        return torch.float32 if on_cpu else "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise NnobsError(f"unknown dtype {dtype!r}: use float32, float16 or bfloat16")
    return value


def load_tokenizer(source: str, revision: str | None, trust_remote_code: bool) -> Any:
    """The model's tokenizer as an nnobs tokenizer, or None if it has none."""
    from transformers import AutoTokenizer

    from nnobs.data.tokenizer import from_hf

    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(
            source, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a model without a tokenizer is still observable from token ids
    # Without tokenizer files some classes (GPT-2's) still load, with an empty vocabulary.
    if not hf_tokenizer.encode("def f(x):", add_special_tokens=False):
        return None
    return from_hf(hf_tokenizer)
