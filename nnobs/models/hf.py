"""Hugging Face causal LMs under nnobs's hook-site names, found generically.

There is no per-family table. The adapter finds the decoder layers (the list of identical
blocks as long as the config's layer count), the attention and MLP modules inside each layer
(by their names), and the projections and norms around them, and then *verifies* every
mapping with one short traced forward pass: a site is offered only when the traced tensors
prove it is what its name says (e.g. ``resid_mid`` is the input of the norm that receives
``resid_pre + attn_out``). A site that cannot be proven is left out, and asking for it
raises an error that says why, instead of returning a guess.

Site meanings for Hugging Face models:

- ``embed``: the input of the first decoder layer (token embedding, plus learned positions
  and any embedding scale, after dropout), i.e. the same tensor as ``blocks.0.resid_pre``.
- ``blocks.{l}.resid_pre`` / ``resid_post``: input / output of decoder layer ``l``.
- ``blocks.{l}.attn_out`` / ``mlp_out``: the attention / MLP module's output, or the output
  of the norm applied to it before the residual add where a model has one (Gemma 2 style).
- ``blocks.{l}.resid_mid``: the stream between attention and MLP, only for sequential
  blocks (absent in parallel-attention families such as GPT-NeoX and Phi).
- ``blocks.{l}.mlp_hidden``: the input of the MLP's output projection.
- ``blocks.{l}.head_out``: the input of the attention's output projection viewed as
  (batch, pos, heads, d_head).
- ``blocks.{l}.attn_pattern``: the weights the attention module returns; only with eager
  attention, and read-only (the fused attention function has already used them).
- ``final``: the output of the final norm, verified to be what the LM head reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnobs.core.errors import NnobsError, first_line
from nnobs.core.version import __version__
from nnobs.models.adapter import ModelAdapter, Site, first_tensor

_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_ATTN_HINTS = ("attn", "attention")
_MLP_HINTS = ("mlp", "feed_forward", "feedforward", "ffn", "ffwd")
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
_REPO_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


# ----------------------------------------------------------------------------- loading


def _load_config(spec: str, revision: str | None, trust_remote_code: bool):
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


def _check_causal_lm(config, spec: str) -> None:
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


def _torch_dtype(dtype: torch.dtype | str | None, device: str | torch.device) -> Any:
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


def _load_tokenizer(source: str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoTokenizer

    from nnobs.data.tokenizer import from_hf

    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(
            source, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a model without a tokenizer is still observable from token ids
    return from_hf(hf_tokenizer)


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
    config, source = _load_config(spec, revision, trust_remote_code)
    _check_causal_lm(config, spec)
    kwargs: dict[str, Any] = {
        "revision": revision,
        "trust_remote_code": trust_remote_code,
        "dtype": _torch_dtype(dtype, device),
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
        raise NnobsError(f"cannot load the weights of {spec!r}: {first_line(e)}") from None
    if str(device) != "auto":
        model.to(device)
    tokenizer = _load_tokenizer(source, revision, trust_remote_code)
    return hf_adapter(model, tokenizer, provenance={"source": spec, "revision": revision})


# --------------------------------------------------------------------- finding modules


def _proj_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a Linear-like module (nn.Linear or GPT-2's transposed Conv1D)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.shape[0], module.nf
    return None


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm | nn.RMSNorm) or "norm" in type(module).__name__.lower()


def _is_container_part(module: nn.Module) -> bool:
    """A module with parameters that is a sub-block (not a norm, projection or dropout)."""
    return (
        not _is_norm(module)
        and _proj_dims(module) is None
        and "dropout" not in type(module).__name__.lower()
        and any(True for _ in module.parameters())
    )


def _child(layer: nn.Module, hints: tuple[str, ...], class_hint: str) -> nn.Module | None:
    found = [
        m
        for name, m in layer.named_children()
        if (any(h in name.lower() for h in hints) or class_hint in type(m).__name__.lower())
        and "cross" not in name.lower()
        and _is_container_part(m)
    ]
    return found[0] if len(found) == 1 else None


def _layer_count(text_config) -> int | None:
    for key in _LAYER_COUNT_KEYS:
        value = getattr(text_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _find_layers(model: nn.Module, text_config) -> nn.ModuleList:
    """The largest list of identical blocks whose length is the config's layer count."""
    expected = _layer_count(text_config)
    lists = [
        m
        for m in model.modules()
        if isinstance(m, nn.ModuleList)
        and len(m) > 0
        and len({type(x) for x in m}) == 1
        and (expected is None or len(m) == expected)
    ]
    if not lists:
        raise NnobsError(
            f"cannot find the decoder layers of {type(model).__name__}: no list of "
            f"{expected or 'identical'} blocks in the model"
        )
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


# ------------------------------------------------------------------------------ tracing

# The trace batch: two rows of seven tokens, so a tensor whose first dim is 14 is recognisably
# (batch × pos) flattened into one dim (OPT runs its MLP on flattened tokens).
_TRACE_SHAPE = (2, 7)


class _Trace:
    """One forward pass recording each watched module's first input and first output.

    Tensors whose tokens were flattened to one leading dim are stored unflattened to
    (batch, pos, ...), and the module is remembered so its sites unflatten too.
    """

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.raw_outputs: dict[int, Any] = {}
        self.flat: set[tuple[int, str]] = set()

    def run(self, model: nn.Module, vocab: int) -> torch.Tensor:
        device = model.get_input_embeddings().weight.device
        n = _TRACE_SHAPE[0] * _TRACE_SHAPE[1]
        ids = ((torch.arange(n, device=device) * 7 + 1) % vocab).view(_TRACE_SHAPE)
        handles = [m.register_forward_hook(self._record, with_kwargs=True) for m in self.modules]
        try:
            with torch.no_grad():
                return model(input_ids=ids, use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()

    def _keep(self, module: nn.Module, where: str, value: Any, store: dict) -> None:
        if not isinstance(value, torch.Tensor):
            return
        value = value.detach().clone()
        if value.dim() >= 1 and value.shape[0] == _TRACE_SHAPE[0] * _TRACE_SHAPE[1]:
            value = value.unflatten(0, _TRACE_SHAPE)
            self.flat.add((id(module), where))
        store[id(module)] = value

    def _record(self, module, args, kwargs, output) -> None:
        self._keep(module, "input", args[0] if args else kwargs.get("hidden_states"), self.inputs)
        self._keep(module, "output", first_tensor(output), self.outputs)
        self.raw_outputs[id(module)] = output

    def inp(self, module: nn.Module | None) -> torch.Tensor | None:
        return None if module is None else self.inputs.get(id(module))

    def out(self, module: nn.Module | None) -> torch.Tensor | None:
        return None if module is None else self.outputs.get(id(module))

    def site(self, module: nn.Module, layer: nn.Module, where: str = "output", **kw) -> Site:
        if (id(module), where) in self.flat:
            return _FlatSite(module, where, layer=layer, **kw)
        return Site(module, where, **kw)


def _close(x: torch.Tensor | None, ref: torch.Tensor | None, scale=None, rel=1e-4) -> bool:
    """x equals ref up to ``rel`` × max|scale| (scale defaults to ref itself).

    For sums, ``scale`` is the smaller addend: matching ``a + b`` only within a fraction of
    |b| proves the tensor contains ``b``, however large ``a`` is.
    """
    if x is None or ref is None or x.shape != ref.shape:
        return False
    size = (ref if scale is None else scale).float().abs().max()
    err = (x.float() - ref.float()).abs().max()
    return bool(err <= rel * size) and bool(size > 0)


def _sum_close(x: torch.Tensor | None, a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None or a.shape != b.shape:
        return False
    # Add in the model's own dtype: it does the same add, so the match is exact.
    return _close(x, a + b, scale=b, rel=1e-2)


# -------------------------------------------------------------------------------- sites


class _WeightsSite(Site):
    """Attention weights: the second element of the attention module's output (read-only)."""


@dataclass(frozen=True)
class _FlatSite(Site):
    """A module that sees tokens flattened to (batch·pos, ...): viewed as (batch, pos, ...)

    using the batch shape of the enclosing decoder layer's input."""

    layer: nn.Module | None = None


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
        if isinstance(site, _FlatSite):
            return _attach_flat(name, site, fns, record, cache, detach)
        if isinstance(site, _WeightsSite):
            return _attach_weights(name, site, fns, record, cache, detach)
        return ModelAdapter._attach(name, site, fns, record, cache, detach)


def _attach_flat(name, site: _FlatSite, fns, record: bool, cache, detach: bool) -> _Handles:
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


def _head_view(n_heads: int):
    return (
        lambda x: x.unflatten(-1, (n_heads, x.shape[-1] // n_heads)),
        lambda x: x.flatten(-2),
    )


def _layer_sites(
    layer: nn.Module, trace: _Trace, n_heads: int | None, eager: bool, missing: dict[str, str]
) -> dict[str, Site]:
    """Sites of one decoder layer, each verified against the traced tensors."""
    sites = {"resid_pre": Site(layer, "input"), "resid_post": Site(layer)}
    x, y = trace.inp(layer), trace.out(layer)
    d_model = y.shape[-1]
    norms = [m for m in layer.children() if _is_norm(m)]
    attn = _child(layer, _ATTN_HINTS, "attention")
    mlp = _child(layer, _MLP_HINTS, "mlp")

    def site(module: nn.Module, where: str = "output", **kw) -> Site:
        return trace.site(module, layer, where, **kw)

    def linears(parent: nn.Module, recurse: bool = True) -> list[nn.Module]:
        mods = parent.modules() if recurse else parent.children()
        return [m for m in mods if (_proj_dims(m) or (0, 0))[1] == d_model]

    def addends(module: nn.Module, value: torch.Tensor) -> list[tuple[Site, torch.Tensor]]:
        # A norm applied to the sublayer's output before the residual add ("sandwich" norm)
        # is part of what the sublayer adds to the stream.
        wrapped = [(site(n), trace.out(n)) for n in norms if _close(trace.inp(n), value)]
        return [*wrapped, (site(module), value)]

    attn_value = trace.out(attn)
    if attn_value is not None:
        sites["attn_out"] = site(attn)
        proj = [m for m in linears(attn) if _close(trace.out(m), attn_value)]
        if proj and n_heads and _proj_dims(proj[-1])[0] % n_heads == 0:
            view, unview = _head_view(n_heads)
            sites["head_out"] = site(proj[-1], "input", view=view, unview=unview)
        else:
            missing["head_out"] = (
                "no projection of the concatenated heads produces the attention output"
            )
        raw = trace.raw_outputs.get(id(attn))
        if eager and isinstance(raw, tuple) and len(raw) > 1 and isinstance(raw[1], torch.Tensor):
            sites["attn_pattern"] = _WeightsSite(attn)
        else:
            missing["attn_pattern"] = (
                "the model does not run eager attention, so the weights are never materialised; "
                "load it with attn_implementation='eager'"
            )
    else:
        for kind in ("attn_out", "head_out", "attn_pattern"):
            missing[kind] = "no unique attention module found in the decoder layer"

    # The MLP's output projection: the last projection to d_model whose output is the MLP's
    # output. Families without an MLP module (OPT) keep the projections directly in the layer;
    # their projection counts only once the residual structure below confirms it.
    mlp_value = trace.out(mlp)
    if mlp_value is not None:
        sites["mlp_out"] = site(mlp)
        found = [m for m in linears(mlp) if _close(trace.out(m), mlp_value)]
        mlp_addends = addends(mlp, mlp_value)
        mlp_proj, proj_verified = (found[-1] if found else None), bool(found)
    else:
        found = linears(layer, recurse=False)
        mlp_proj, proj_verified = (found[-1] if found else None), False
        mlp_addends = addends(mlp_proj, trace.out(mlp_proj)) if mlp_proj is not None else []

    # resid_mid: a norm whose input is resid_pre + attn_out; its input is the stream between
    # the sublayers for pre-norm, its output for post-norm (told apart by where mlp_out is added).
    mid: Site | None = None
    candidates = addends(attn, attn_value) if attn_value is not None else []
    for (attn_site, a), norm in ((c, n) for c in candidates for n in norms):
        if mid is not None or not _sum_close(trace.inp(norm), x, a):
            continue
        targets = [y, *(trace.inp(n) for n in norms)]
        for mlp_site, m in mlp_addends:
            if any(_sum_close(t, trace.inp(norm), m) for t in targets):
                mid = site(norm, "input")
            elif any(_sum_close(t, trace.out(norm), m) for t in targets):
                mid = site(norm)
            else:
                continue
            sites["attn_out"], sites["mlp_out"] = attn_site, mlp_site
            proj_verified = proj_verified or mlp_proj is not None
            break
    if mid is not None:
        sites["resid_mid"] = mid
    else:
        missing["resid_mid"] = (
            "attention and the MLP are not applied one after the other with a residual add "
            "between them (e.g. parallel attention), so no stream exists between them"
        )
    if proj_verified:
        sites["mlp_hidden"] = site(mlp_proj, "input")
        sites.setdefault("mlp_out", site(mlp_proj))
    else:
        missing["mlp_hidden"] = "no output projection of the MLP could be identified"
        if "mlp_out" not in sites:
            missing["mlp_out"] = "no unique MLP module found in the decoder layer"
    return sites


def _config_hash(config) -> str:
    data = json.loads(config.to_json_string())
    for key in _VOLATILE_CONFIG_KEYS:
        data.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def _logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _logits_are_head_output(model: nn.Module, head: nn.Module, vocab: int) -> bool:
    """Whether the model returns its output head's result as is. Logit soft-capping or
    rescaling after the head (Gemma 2, Cohere, Granite) is close to the identity on the small
    logits of a trace, so the head's output is amplified here until any such step shows."""
    amplified: list[torch.Tensor] = []

    def amplify(module, args, output):
        amplified.append(output * 64.0)
        return amplified[-1]

    handle = head.register_forward_hook(amplify)
    try:
        logits = _Trace([]).run(model, vocab)
    finally:
        handle.remove()
    return len(amplified) == 1 and _close(logits, amplified[0], rel=1e-4)


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
    _check_causal_lm(model.config, arch)
    model.eval()
    text_config = model.config.get_text_config()
    layers = _find_layers(model, text_config)
    head = model.get_output_embeddings()
    inside = {id(m) for layer in layers for m in layer.modules()}
    final_norms = [m for m in model.modules() if _is_norm(m) and id(m) not in inside]
    watched = [m for layer in layers for m in layer.modules()] + final_norms
    if head is not None:
        watched.append(head)

    trace = _Trace(watched)
    logits = trace.run(model, int(text_config.vocab_size))

    eager = getattr(model.config, "_attn_implementation", None) == "eager"
    n_heads = getattr(text_config, "num_attention_heads", None)
    missing: dict[str, str] = {}
    sites: dict[str, Site] = {"embed": Site(layers[0], "input")}
    for index, layer in enumerate(layers):
        for kind, site in _layer_sites(layer, trace, n_heads, eager, missing).items():
            sites[f"blocks.{index}.{kind}"] = site

    last = trace.out(layers[-1])
    final = next((n for n in final_norms if _close(trace.out(n), trace.inp(head))), None)
    unembed_fn = None
    if final is not None:
        sites["final"] = Site(final)
        candidate = lambda x: head(final(x))  # noqa: E731
    else:
        candidate = head if head is not None and _close(trace.inp(head), last) else None
    with torch.no_grad():
        if (
            candidate is not None
            and _close(candidate(last), logits, rel=1e-3)
            and _logits_are_head_output(model, head, int(text_config.vocab_size))
        ):
            unembed_fn = candidate

    context = next(
        (
            getattr(text_config, k)
            for k in ("max_position_embeddings", "n_positions")
            if isinstance(getattr(text_config, k, None), int)
        ),
        None,
    )
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
            "context_length": context,
            "nnobs_version": __version__,
            **(provenance or {}),
        },
        logits_fn=_logits,
        unembed_fn=unembed_fn,
        missing=missing,
    )
