"""One interface over every model nnobs can load: named hook sites, capture and edits.

An adapter maps each site name (``embed``, ``blocks.{l}.resid_post``, ``final``, … — the kinds
are listed in :mod:`nnobs.models.sites`) to a place in the underlying ``nn.Module`` where PyTorch
hooks can read or replace the activation. nnobs models expose
:class:`~nnobs.models.transformer.HookPoint` modules; Hugging Face models are mapped onto the
same names by :mod:`nnobs.models.hf`. Every method in
nnobs (capture, probes, interventions) talks only to this interface.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from nnobs.core.errors import NnobsError
from nnobs.core.results import software_provenance
from nnobs.models.sites import LAYER_SITE_KINDS, ROUTE_SITE_KINDS

Edit = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Site:
    """Where a named activation lives in a module tree.

    ``where="output"`` reads the module's output (the first element if it returns a tuple);
    ``where="input"`` reads its first positional argument, or the keyword ``input_name``.
    ``view`` reshapes the raw tensor into the site's documented shape and ``unview`` maps an
    edited tensor back (e.g. per-head outputs are stored flat before the output projection).
    """

    module: nn.Module
    where: Literal["output", "input"] = "output"
    input_name: str | None = None
    view: Callable[[torch.Tensor], torch.Tensor] | None = None
    unview: Callable[[torch.Tensor], torch.Tensor] | None = None


def first_tensor(value: Any) -> torch.Tensor:
    """A module's output tensor, or the first element of a tuple or list of outputs."""
    return value[0] if isinstance(value, tuple | list) else value


def _replace_first(value: Any, new: torch.Tensor) -> Any:
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    return new


@dataclass
class ModelAdapter:
    """A causal LM with named hook sites.

    ``model`` maps token ids (batch, pos) to logits through :meth:`forward`; ``sites`` names
    every hookable activation; ``provenance`` records where the model came from (path or hub
    revision, config hash) so every result can say what it measured.
    """

    model: nn.Module
    sites: dict[str, Site]
    n_layers: int
    d_model: int
    vocab_size: int
    tokenizer: Any = None
    provenance: dict[str, Any] = field(default_factory=dict)
    logits_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None
    unembed_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    # Token ids → the residual stream after the last block (what unembed_fn reads): lets a
    # caller form logits a few rows at a time instead of holding (batch, pos, vocab) at once.
    stream_fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None

    @property
    def context_length(self) -> int | None:
        """The model's context in tokens, where its provenance states one."""
        return self.provenance.get("max_seq_len") or self.provenance.get("context_length")

    @property
    def device(self) -> torch.device:
        """Where the model's (first) parameters live."""
        return next(self.model.parameters()).device

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (batch, pos, vocab) for token ids (batch, pos)."""
        if self.logits_fn is not None:
            return self.logits_fn(self.model, input_ids, attention_mask)
        return self.model(input_ids)

    def site_name(self, layer: int, kind: str = "resid_post") -> str:
        """The name of a per-layer site; negative layers count from the end."""
        if kind not in LAYER_SITE_KINDS:
            raise NnobsError(
                f"unknown site kind {kind!r}: choose one of {', '.join(LAYER_SITE_KINDS)}"
            )
        if not -self.n_layers <= layer < self.n_layers:
            raise NnobsError(
                f"layer {layer} is out of range: the model has layers 0..{self.n_layers - 1}"
            )
        return f"blocks.{layer % self.n_layers}.{kind}"

    def resolve(self, site: str) -> Site:
        """The :class:`Site` for a name, or one clear error naming what exists."""
        if site in self.sites:
            return self.sites[site]
        match = re.fullmatch(r"blocks\.(-?\d+)\.(\w+)", site)
        if match and match.group(2) in LAYER_SITE_KINDS:
            layer = int(match.group(1))
            if not 0 <= layer < self.n_layers:
                raise NnobsError(
                    f"site {site!r}: layer {layer} is out of range, the model has layers "
                    f"0..{self.n_layers - 1}"
                )
            if match.group(2) in ROUTE_SITE_KINDS:
                residual = self.provenance.get("config", {}).get("residual", "add")
                raise NnobsError(
                    f"site {site!r} needs a routed residual, and this model's residual is "
                    f"{residual!r}: train with model.residual = 'attnres' or wrap the model "
                    "(nnobs routing --wrap-blocks N)"
                )
            raise NnobsError(
                f"site {site!r} is not available in this architecture "
                f"({self.provenance.get('architecture', type(self.model).__name__)})"
            )
        raise NnobsError(
            f"unknown hook site {site!r}: sites are embed, final and blocks.<layer>.<kind> with "
            f"kind one of {', '.join(LAYER_SITE_KINDS)}"
        )

    @contextmanager
    def hooks(
        self,
        capture: Iterable[str] = (),
        edits: Mapping[str, Edit | list[Edit]] | None = None,
        detach: bool = True,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Within the block, forward passes apply ``edits`` and record ``capture`` sites.

        Each edit receives the site's activation (in the site's documented shape) and returns
        its replacement. A captured site records the value after any edit at that site. The
        yielded dict is filled by each forward pass (the last pass wins).
        """
        cache: dict[str, torch.Tensor] = {}
        edits = dict(edits or {})
        wanted = list(dict.fromkeys([*capture, *edits]))
        handles = []
        try:
            for name in wanted:
                site = self.resolve(name)
                fns = edits.get(name, [])
                fns = fns if isinstance(fns, list) else [fns]
                handles.append(self._attach(name, site, fns, name in capture, cache, detach))
            yield cache
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _attach(name, site: Site, fns: list[Edit], record: bool, cache, detach: bool):
        def apply(raw: torch.Tensor) -> torch.Tensor | None:
            value = site.view(raw) if site.view else raw
            for fn in fns:
                value = fn(value)
            if record:
                cache[name] = value.detach() if detach else value
            if not fns:
                return None
            return site.unview(value) if site.unview else value

        if site.where == "output":

            def output_hook(module, args, output):
                new = apply(first_tensor(output))
                return None if new is None else _replace_first(output, new)

            return site.module.register_forward_hook(output_hook)

        def input_hook(module, args, kwargs):
            if args:
                new = apply(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            key = site.input_name or "hidden_states"
            new = apply(kwargs[key])
            return None if new is None else (args, {**kwargs, key: new})

        return site.module.register_forward_pre_hook(input_hook, with_kwargs=True)

    def run_with_cache(
        self,
        input_ids: torch.Tensor,
        capture: Iterable[str],
        attention_mask: torch.Tensor | None = None,
        edits: Mapping[str, Edit | list[Edit]] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One forward pass without gradients: logits and the captured sites."""
        with torch.no_grad(), self.hooks(capture, edits) as cache:
            logits = self.forward(input_ids, attention_mask)
        return logits, cache


def nnobs_adapter(
    model: nn.Module, tokenizer: Any = None, provenance: dict | None = None
) -> ModelAdapter:
    """Adapter for an nnobs :class:`~nnobs.models.transformer.Transformer` (sites: HookPoints)."""
    from nnobs.models.transformer import Transformer

    if not isinstance(model, Transformer):
        raise NnobsError(f"expected an nnobs Transformer, got {type(model).__name__}")
    cfg = model.config
    return ModelAdapter(
        model=model,
        sites={name: Site(hook) for name, hook in model.hook_points().items()},
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        vocab_size=cfg.vocab_size,
        tokenizer=tokenizer,
        provenance={
            "kind": "nnobs",
            "architecture": "nnobs.Transformer",
            "config": cfg.to_dict(),
            "config_hash": cfg.hash,
            "max_seq_len": cfg.max_seq_len,
            **(provenance or {}),
        },
        unembed_fn=model.readout,
        stream_fn=lambda input_ids, _mask: model.stream(input_ids),
    )


def provenance(adapter: ModelAdapter) -> dict:
    """The model's provenance plus the software, device, host and time of this computation."""
    return {
        **adapter.provenance,
        **software_provenance(),
        "device": str(adapter.device),
    }
