"""Finding nnobs's hook sites in a Hugging Face causal LM, and proving each one.

There is no per-family table. The decoder layers are the list of identical blocks as long as
the config's layer count; the attention and MLP modules inside each layer are found by their
names, and the projections and norms around them by type. Every mapping is then *verified*
with one short traced forward pass: a site is offered only when the traced tensors prove it
is what its name says (e.g. ``resid_mid`` is the input of the norm that receives
``resid_pre + attn_out``). A site that cannot be proven is left out with the reason.

Site meanings for Hugging Face models (the kinds are those of :mod:`nnobs.models.sites`):

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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nnobs.core.errors import NnobsError
from nnobs.models.adapter import Site, first_tensor

_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_ATTN_HINTS = ("attn", "attention")
_MLP_HINTS = ("mlp", "feed_forward", "feedforward", "ffn", "ffwd")

# --------------------------------------------------------------------- finding modules


def _proj_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a Linear-like module (nn.Linear or GPT-2's transposed Conv1D)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.shape[0], module.nf
    return None


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer (by type, or by its class name)."""
    return isinstance(module, nn.LayerNorm | nn.RMSNorm) or "norm" in type(module).__name__.lower()


def _is_container_part(module: nn.Module) -> bool:
    """A module with parameters that is a sub-block (not a norm, projection or dropout)."""
    return (
        not is_norm(module)
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


def _layer_count(text_config: Any) -> int | None:
    for key in _LAYER_COUNT_KEYS:
        value = getattr(text_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def find_layers(model: nn.Module, text_config: Any) -> nn.ModuleList:
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


class WeightsSite(Site):
    """Attention weights: the second element of the attention module's output (read-only)."""


@dataclass(frozen=True)
class FlatSite(Site):
    """A module that sees tokens flattened to (batch·pos, ...): viewed as (batch, pos, ...)

    using the batch shape of the enclosing decoder layer's input."""

    layer: nn.Module | None = None


class Trace:
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
        """One forward pass of the trace batch, recording the watched modules: its logits."""
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
        """The module's traced first input (None if not traced)."""
        return None if module is None else self.inputs.get(id(module))

    def out(self, module: nn.Module | None) -> torch.Tensor | None:
        """The module's traced first output (None if not traced)."""
        return None if module is None else self.outputs.get(id(module))

    def site(self, module: nn.Module, layer: nn.Module, where: str = "output", **kw) -> Site:
        """A site at ``module``, unflattening tokens where the trace saw them flattened."""
        if (id(module), where) in self.flat:
            return FlatSite(module, where, layer=layer, **kw)
        return Site(module, where, **kw)


def close(
    x: torch.Tensor | None,
    ref: torch.Tensor | None,
    scale: torch.Tensor | None = None,
    rel: float = 1e-4,
) -> bool:
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
    return close(x, a + b, scale=b, rel=1e-2)


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
        logits = Trace([]).run(model, vocab)
    finally:
        handle.remove()
    return len(amplified) == 1 and close(logits, amplified[0], rel=1e-4)


def find_readout(
    model: nn.Module,
    head: nn.Module | None,
    final_norms: list[nn.Module],
    trace: Trace,
    last: torch.Tensor,
    logits: torch.Tensor,
    vocab: int,
) -> tuple[nn.Module | None, Callable[[torch.Tensor], torch.Tensor] | None]:
    """The final norm (the norm outside the layers whose output the LM head reads), and the
    map from the last layer's output ``last`` to logits (None unless it gives the model's
    ``logits`` for the trace's tokens, ids below ``vocab``)."""
    final = next((n for n in final_norms if close(trace.out(n), trace.inp(head))), None)
    if final is not None:
        candidate = lambda x: head(final(x))  # noqa: E731
    else:
        candidate = head if head is not None and close(trace.inp(head), last) else None
    with torch.no_grad():
        if (
            candidate is not None
            and close(candidate(last), logits, rel=1e-3)
            and _logits_are_head_output(model, head, vocab)
        ):
            return final, candidate
    return final, None


# ----------------------------------------------------------------- one layer's sites


class _LayerTrace:
    """One decoder layer as the trace saw it: its input and output, and its norms."""

    def __init__(self, layer: nn.Module, trace: Trace) -> None:
        self.layer, self.trace = layer, trace
        self.x, self.y = trace.inp(layer), trace.out(layer)
        self.norms = [m for m in layer.children() if is_norm(m)]

    def site(self, module: nn.Module, where: str = "output", **kw) -> Site:
        """A site at ``module`` inside this layer."""
        return self.trace.site(module, self.layer, where, **kw)

    def projections_to_stream(self, parent: nn.Module, recurse: bool = True) -> list[nn.Module]:
        """Linear-like modules in ``parent`` whose output is as wide as the stream."""
        mods = parent.modules() if recurse else parent.children()
        return [m for m in mods if (_proj_dims(m) or (0, 0))[1] == self.y.shape[-1]]

    def addends(self, module: nn.Module, value: torch.Tensor) -> list[tuple[Site, torch.Tensor]]:
        """Where what ``module`` adds to the stream can be read: a norm applied to its output
        before the residual add ("sandwich" norm) is part of what it adds; then the module."""
        wrapped = [
            (self.site(n), self.trace.out(n)) for n in self.norms if close(self.trace.inp(n), value)
        ]
        return [*wrapped, (self.site(module), value)]


def _head_view(n_heads: int) -> tuple[Callable, Callable]:
    return (
        lambda x: x.unflatten(-1, (n_heads, x.shape[-1] // n_heads)),
        lambda x: x.flatten(-2),
    )


def _attention_sites(
    view: _LayerTrace, attn: nn.Module | None, n_heads: int | None, eager: bool, missing: dict
) -> dict[str, Site]:
    """``attn_out``, ``head_out`` and ``attn_pattern``, those that the trace proves."""
    value = view.trace.out(attn)
    if value is None:
        for kind in ("attn_out", "head_out", "attn_pattern"):
            missing[kind] = "no unique attention module found in the decoder layer"
        return {}
    sites = {"attn_out": view.site(attn)}
    proj = [m for m in view.projections_to_stream(attn) if close(view.trace.out(m), value)]
    if proj and n_heads and _proj_dims(proj[-1])[0] % n_heads == 0:
        unflatten, flatten = _head_view(n_heads)
        sites["head_out"] = view.site(proj[-1], "input", view=unflatten, unview=flatten)
    else:
        missing["head_out"] = (
            "no projection of the concatenated heads produces the attention output"
        )
    raw = view.trace.raw_outputs.get(id(attn))
    if eager and isinstance(raw, tuple) and len(raw) > 1 and isinstance(raw[1], torch.Tensor):
        sites["attn_pattern"] = WeightsSite(attn)
    else:
        missing["attn_pattern"] = (
            "the model does not run eager attention, so the weights are never materialised; "
            "load it with attn_implementation='eager'"
        )
    return sites


@dataclass
class _MLPSide:
    """The MLP as the trace saw it: its module's site, its output projection (``verified``
    when the trace proved it), and where what it adds to the stream can be read."""

    site: Site | None
    proj: nn.Module | None
    verified: bool
    addends: list[tuple[Site, torch.Tensor]]


def _mlp_side(view: _LayerTrace, mlp: nn.Module | None) -> _MLPSide:
    """The MLP's output projection: the last projection to the stream whose output is the
    MLP's output. Families without an MLP module (OPT) keep the projections directly in the
    layer; their projection counts only once the residual structure confirms it."""
    value = view.trace.out(mlp)
    if value is not None:
        found = [m for m in view.projections_to_stream(mlp) if close(view.trace.out(m), value)]
        proj = found[-1] if found else None
        return _MLPSide(view.site(mlp), proj, bool(found), view.addends(mlp, value))
    found = view.projections_to_stream(view.layer, recurse=False)
    proj = found[-1] if found else None
    addends = view.addends(proj, view.trace.out(proj)) if proj is not None else []
    return _MLPSide(None, proj, False, addends)


def _between_sublayers(
    view: _LayerTrace, attn_addends: list, mlp_addends: list
) -> tuple[Site, Site, Site] | None:
    """(resid_mid, attn_out, mlp_out) where attention and the MLP are applied one after the
    other with a residual add between them, else None.

    ``resid_mid`` is read at a norm whose input is resid_pre + attn_out: its input is the
    stream between the sublayers for pre-norm, its output for post-norm (told apart by where
    mlp_out is added).
    """
    trace = view.trace
    targets = [view.y, *(trace.inp(n) for n in view.norms)]
    for attn_site, a in attn_addends:
        for norm in view.norms:
            if not _sum_close(trace.inp(norm), view.x, a):
                continue
            for mlp_site, m in mlp_addends:
                if any(_sum_close(t, trace.inp(norm), m) for t in targets):
                    return view.site(norm, "input"), attn_site, mlp_site
                if any(_sum_close(t, trace.out(norm), m) for t in targets):
                    return view.site(norm), attn_site, mlp_site
    return None


def layer_sites(
    layer: nn.Module, trace: Trace, n_heads: int | None, eager: bool, missing: dict[str, str]
) -> dict[str, Site]:
    """Sites of one decoder layer, each verified against the traced tensors; ``missing``
    gains the reason for each kind that could not be proven."""
    view = _LayerTrace(layer, trace)
    attn = _child(layer, _ATTN_HINTS, "attention")
    sites = {"resid_pre": Site(layer, "input"), "resid_post": Site(layer)}
    sites.update(_attention_sites(view, attn, n_heads, eager, missing))
    mlp = _mlp_side(view, _child(layer, _MLP_HINTS, "mlp"))
    if mlp.site is not None:
        sites["mlp_out"] = mlp.site
    attn_value = trace.out(attn)
    attn_addends = view.addends(attn, attn_value) if attn_value is not None else []
    between = _between_sublayers(view, attn_addends, mlp.addends)
    proj_verified = mlp.verified
    if between is not None:
        sites["resid_mid"], sites["attn_out"], sites["mlp_out"] = between
        proj_verified = proj_verified or mlp.proj is not None
    else:
        missing["resid_mid"] = (
            "attention and the MLP are not applied one after the other with a residual add "
            "between them (e.g. parallel attention), so no stream exists between them"
        )
    if proj_verified:
        sites["mlp_hidden"] = view.site(mlp.proj, "input")
        sites.setdefault("mlp_out", view.site(mlp.proj))
    else:
        missing["mlp_hidden"] = "no output projection of the MLP could be identified"
        if "mlp_out" not in sites:
            missing["mlp_out"] = "no unique MLP module found in the decoder layer"
    return sites
