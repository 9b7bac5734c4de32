"""Hugging Face causal LMs under nnobs's hook-site names.

:func:`load_hf_model` loads a decoder-only causal LM (local directory or hub name) and
:func:`hf_adapter` wraps one: it finds and verifies every hook site with one traced forward
pass (:mod:`nnobs.models.hf_sites`), and the :class:`HFAdapter` it returns explains, for a
site an architecture does not have, why.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nnobs.core.errors import NnobsError, first_line
from nnobs.core.version import __version__
from nnobs.models.adapter import ModelAdapter, Site
from nnobs.models.hf_loading import (
    check_causal_lm,
    check_safetensors,
    load_config,
    load_tokenizer,
    torch_dtype,
)
from nnobs.models.hf_sites import (
    FlatSite,
    Trace,
    WeightsSite,
    find_layers,
    find_readout,
    is_norm,
    layer_sites,
)
from nnobs.models.sites import LAYER_SITE_KINDS

# Config keys that change with how a model is loaded, not with what it is.
_VOLATILE_CONFIG_KEYS = (
    "_commit_hash",
    "_name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "_attn_implementation",
    "_attn_implementation_internal",
)


def load_hf_model(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
) -> ModelAdapter:
    """Load a decoder-only causal LM (local directory or hub name) and wrap it in an adapter.

    ``device="auto"`` spreads a model too large for one device over all devices.
    ``attn_implementation="eager"`` makes attention weights (``attn_pattern``) readable.
    """
    from transformers import AutoModelForCausalLM

    spec = str(name_or_path)
    config, source = load_config(spec, revision, trust_remote_code)
    check_causal_lm(config, spec)
    check_safetensors(source, spec)
    kwargs: dict[str, Any] = {
        "revision": revision,
        "trust_remote_code": trust_remote_code,
        "dtype": torch_dtype(dtype, device),
        "use_safetensors": True,  # never unpickle weights: a pickle can run code
    }
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if str(device) == "auto":
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise NnobsError(
                "device='auto' spreads a model over devices with the accelerate package: "
                "pip install accelerate, or name one device"
            ) from None
        kwargs["device_map"] = "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        hint = "; nnobs loads safetensors weights only" if "safetensors" in str(e) else ""
        raise NnobsError(f"cannot load the weights of {spec!r}: {first_line(e)}{hint}") from None
    if str(device) != "auto":
        model.to(device)
    tokenizer = load_tokenizer(source, revision, trust_remote_code)
    return hf_adapter(model, tokenizer, provenance={"source": spec, "revision": revision})


class _Handles:
    def __init__(self, *handles) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class HFAdapter(ModelAdapter):
    """A :class:`ModelAdapter` that also reads attention weights and explains missing sites.

    ``missing`` maps a site kind to why this architecture does not have it.
    """

    missing: dict[str, str] = field(default_factory=dict)

    def resolve(self, site: str) -> Site:
        """As :meth:`ModelAdapter.resolve`, saying why a site this architecture lacks is absent."""
        try:
            return super().resolve(site)
        except NnobsError:
            kind = site.rsplit(".", 1)[-1]
            match = re.fullmatch(r"blocks\.(\d+)\.\w+", site)
            if match and int(match.group(1)) < self.n_layers and kind in self.missing:
                raise NnobsError(
                    f"site {site!r} is not available in this architecture "
                    f"({self.provenance.get('architecture')}): {self.missing[kind]}"
                ) from None
            raise

    @staticmethod
    def _attach(name, site: Site, fns, record: bool, cache, detach: bool):
        if isinstance(site, FlatSite):
            return _attach_flat(name, site, fns, record, cache, detach)
        if isinstance(site, WeightsSite):
            return _attach_weights(name, site, fns, record, cache, detach)
        return ModelAdapter._attach(name, site, fns, record, cache, detach)


def _attach_flat(name, site: FlatSite, fns, record: bool, cache, detach: bool) -> _Handles:
    batch_shape: list[torch.Size] = []

    def remember(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        batch_shape[:] = [x.shape[:2]]

    def view(x: torch.Tensor) -> torch.Tensor:
        x = x.unflatten(0, batch_shape[0])
        return site.view(x) if site.view else x

    def unview(x: torch.Tensor) -> torch.Tensor:
        return (site.unview(x) if site.unview else x).flatten(0, 1)

    first = site.layer.register_forward_pre_hook(remember, with_kwargs=True)
    plain = Site(site.module, site.where, site.input_name, view=view, unview=unview)
    return _Handles(first, ModelAdapter._attach(name, plain, fns, record, cache, detach))


def _attach_weights(name, site: Site, fns, record: bool, cache, detach: bool):
    if fns:
        raise NnobsError(
            f"{name} can be read but not edited in a Hugging Face model: the attention "
            "output is computed from the weights before they are returned"
        )

    def hook(module, args, output):
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise NnobsError(
                f"{name}: the attention module returned no weights; load the model with "
                "attn_implementation='eager'"
            )
        if record:
            cache[name] = weights.detach() if detach else weights

    return site.module.register_forward_hook(hook)


def _config_hash(config) -> str:
    data = json.loads(config.to_json_string())
    for key in _VOLATILE_CONFIG_KEYS:
        data.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def _logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _context_length(text_config: Any) -> int | None:
    return next(
        (
            getattr(text_config, k)
            for k in ("max_position_embeddings", "n_positions")
            if isinstance(getattr(text_config, k, None), int)
        ),
        None,
    )


def hf_adapter(
    model: nn.Module, tokenizer: Any = None, provenance: dict[str, Any] | None = None
) -> ModelAdapter:
    """Adapter for an already built ``PreTrainedModel`` causal LM (put in eval mode).

    Runs one forward pass of a few tokens to find and verify every hook site.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise NnobsError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    arch = type(model).__name__
    check_causal_lm(model.config, arch)
    model.eval()
    text_config = model.config.get_text_config()
    layers = find_layers(model, text_config)
    head = model.get_output_embeddings()
    inside = {id(m) for layer in layers for m in layer.modules()}
    final_norms = [m for m in model.modules() if is_norm(m) and id(m) not in inside]
    watched = [m for layer in layers for m in layer.modules()] + final_norms
    if head is not None:
        watched.append(head)

    trace = Trace(watched)
    vocab = int(text_config.vocab_size)
    logits = trace.run(model, vocab)

    eager = getattr(model.config, "_attn_implementation", None) == "eager"
    n_heads = getattr(text_config, "num_attention_heads", None)
    missing: dict[str, str] = {}
    sites: dict[str, Site] = {"embed": Site(layers[0], "input")}
    for index, layer in enumerate(layers):
        found = layer_sites(layer, trace, n_heads, eager, missing)
        sites.update(
            (f"blocks.{index}.{kind}", found[kind]) for kind in LAYER_SITE_KINDS if kind in found
        )

    last = trace.out(layers[-1])
    final, unembed_fn = find_readout(model, head, final_norms, trace, last, logits, vocab)
    if final is not None:
        sites["final"] = Site(final)
    return HFAdapter(
        model=model,
        sites=sites,
        n_layers=len(layers),
        d_model=int(last.shape[-1]),
        vocab_size=int(logits.shape[-1]),
        tokenizer=tokenizer,
        provenance={
            "kind": "hf",
            "architecture": arch,
            "commit": getattr(model.config, "_commit_hash", None),
            "config_hash": _config_hash(model.config),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "context_length": _context_length(text_config),
            "nnobs_version": __version__,
            **(provenance or {}),
        },
        logits_fn=_logits,
        unembed_fn=unembed_fn,
        missing=missing,
    )
