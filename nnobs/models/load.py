"""Load any model nnobs understands (an nnobs run or checkpoint, a Hugging Face causal LM)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from nnobs.core.errors import NnobsError
from nnobs.core.rundir import is_nnobs_path
from nnobs.models.adapter import ModelAdapter, nnobs_adapter
from nnobs.models.devices import check_device

# What a model with NaN or infinite weights is: no setting, float32 included, would help it.
NONFINITE_WEIGHTS = "the model's weights are not finite (checkpoint damaged or diverged)"


def random_init_like(adapter: ModelAdapter, seed: int = 0) -> ModelAdapter:
    """The same architecture with freshly initialised weights: the detection floor's null model."""
    from nnobs.models.transformer import Transformer

    if isinstance(adapter.model, Transformer):
        model = Transformer(adapter.model.config, generator=torch.Generator().manual_seed(seed))
        wrap = nnobs_adapter
    else:
        from transformers import AutoModelForCausalLM

        from nnobs.models.hf import hf_adapter

        # transformers initialises from torch's global generator: seed a fork of it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(adapter.model.config)
        wrap = hf_adapter
    dtype = next(adapter.model.parameters()).dtype
    model = model.to(device=adapter.device, dtype=dtype).eval()
    provenance = {**adapter.provenance, "random_init": True, "random_init_seed": seed}
    return wrap(model, adapter.tokenizer, provenance)


def nonfinite_weight(model: nn.Module) -> str | None:
    """Which weight of ``model`` holds NaN or infinite values (and how many), or None."""
    for name, weight in model.named_parameters():
        if weight.device.type == "meta" or not weight.is_floating_point():
            continue  # offloaded (nothing to read here) or not a number that could overflow
        bad = int((~torch.isfinite(weight.detach())).sum())
        if bad:
            return f"{name} has {bad} non-finite values (NaN or infinite)"
    return None


def check_finite_weights(model: nn.Module) -> None:
    """Refuse a model with a weight that is NaN or infinite: every activation downstream would
    be too, and no precision (float32 included) would help."""
    weight = nonfinite_weight(model)
    if weight is not None:
        raise NnobsError(f"{NONFINITE_WEIGHTS}: {weight}; use another checkpoint")


def load_model(
    spec: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    step: int | None = None,
) -> ModelAdapter:
    """Load any model nnobs understands and wrap it in an adapter.

    ``spec`` is an nnobs run directory (its latest checkpoint, or ``step``), an nnobs checkpoint
    directory, or a Hugging Face causal LM given by local path or hub name.
    """
    from nnobs.models import hf
    from nnobs.models.checkpoint import load_checkpoint

    if str(device) != "auto":  # "auto" places a Hugging Face model over what there is
        check_device(device)
    path = Path(spec)
    if path.exists() and is_nnobs_path(path):
        loaded = load_checkpoint(path, step=step)
        model = loaded.model.to(device=device, dtype=dtype or torch.float32).eval()
        adapter = nnobs_adapter(model, loaded.tokenizer, loaded.provenance())
    else:
        adapter = hf.load_hf_model(
            str(spec), device=device, dtype=dtype, trust_remote_code=trust_remote_code
        )
    check_finite_weights(adapter.model)
    return adapter
