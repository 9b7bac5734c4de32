"""Sparse autoencoders on a hook site, stored in SAELens's directory format.

A dictionary of ``d_sae`` features for a site of width ``d_in``::

    pre  = (x - b_dec) @ W_enc + b_enc        (b_dec subtracted when apply_b_dec_to_input)
    f    = relu(topk(pre, k))                 (topk: all but the k largest set to zero)
    xhat = f @ W_dec + b_dec

A directory holds ``sae_weights.safetensors`` (``W_enc`` d_in × d_sae, ``W_dec`` d_sae × d_in,
``b_enc``, ``b_dec``) and ``cfg.json`` with SAELens's keys (``architecture``, ``d_in``,
``d_sae``, ``k``, ``dtype``, ``apply_b_dec_to_input``, ``normalize_activations``,
``metadata.hook_name``, ...), so ``sae_lens.SAE.load_from_disk`` reads what nnobs writes.
SAELens directories load back: TopK, standard (ReLU) and JumpReLU dictionaries, in the
current layout (``metadata``) and the older flat one (``hook_name``, ``activation_fn_kwargs``).
Hook names are written in TransformerLens's spelling (``blocks.1.hook_resid_post``) and read
in either spelling.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from nnobs.core.errors import NnobsError
from nnobs.core.files import atomic_path, read_json, write_json

WEIGHTS_FILE, CONFIG_FILE = "sae_weights.safetensors", "cfg.json"
# The SAELens layout the config follows (``metadata`` holds the hook; without a version
# SAELens reads a config as its older flat layout and drops the metadata).
SAELENS_LAYOUT = "6.0.0"
ARCHITECTURES = ("topk", "standard", "jumprelu")
# nnobs site kind <-> TransformerLens hook name inside a block.
_TL_HOOKS = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "mlp_hidden": "mlp.hook_post",
}


def tl_hook_name(site: str) -> str:
    """The TransformerLens name of an nnobs site (``blocks.1.resid_post`` →
    ``blocks.1.hook_resid_post``); sites it has no name for are kept as they are."""
    match = re.fullmatch(r"blocks\.(\d+)\.(\w+)", site)
    if match and match.group(2) in _TL_HOOKS:
        return f"blocks.{match.group(1)}.{_TL_HOOKS[match.group(2)]}"
    return {"embed": "hook_embed", "final": "ln_final.hook_normalized"}.get(site, site)


def nnobs_site(hook_name: str) -> str:
    """The nnobs site of a hook name in either spelling (the inverse of :func:`tl_hook_name`)."""
    for kind, tl in _TL_HOOKS.items():
        match = re.fullmatch(rf"blocks\.(\d+)\.{re.escape(tl)}", hook_name)
        if match:
            return f"blocks.{match.group(1)}.{kind}"
    return {"hook_embed": "embed", "ln_final.hook_normalized": "final"}.get(hook_name, hook_name)


class SparseAutoencoder(nn.Module):
    """A dictionary of ``d_sae`` features of a ``d_in``-wide site (see the module doc).

    ``site`` is the nnobs hook site it reads; ``metadata`` is stored in ``cfg.json`` as is
    (training settings and metrics)."""

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int | None = None,
        *,
        site: str,
        architecture: str = "topk",
        apply_b_dec_to_input: bool = True,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise NnobsError(
                f"unknown SAE architecture {architecture!r}: {', '.join(ARCHITECTURES)}"
            )
        if architecture == "topk" and not (isinstance(k, int) and 1 <= k <= d_sae):
            raise NnobsError(f"a TopK SAE needs 1 <= k <= d_sae ({d_sae}), got k={k!r}")
        self.d_in, self.d_sae, self.k, self.site = d_in, d_sae, k, site
        self.architecture, self.apply_b_dec_to_input = architecture, apply_b_dec_to_input
        self.metadata = dict(metadata or {})
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae))

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's output before the sparsifying nonlinearity."""
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Feature activations from pre-activations."""
        if self.architecture == "topk":
            top = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
        if self.architecture == "jumprelu":
            return pre.relu() * (pre > self.threshold)
        return pre.relu()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) activations → (..., d_sae) feature activations."""
        return self.activate(self.pre_activations(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """(..., d_sae) feature activations → (..., d_in) reconstruction."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Scale every decoder row to unit norm (a feature's activation is then its size)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    def config(self) -> dict[str, Any]:
        """``cfg.json``: SAELens's keys, and nnobs's site and metrics in ``metadata``."""
        cfg: dict[str, Any] = {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": {
                "sae_lens_version": SAELENS_LAYOUT,
                "sae_lens_training_version": SAELENS_LAYOUT,
                **self.metadata,
                "hook_name": tl_hook_name(self.site),
            },
        }
        if self.architecture == "topk":
            cfg.update(k=self.k, rescale_acts_by_decoder_norm=False)
        return cfg

    def save(self, directory: str | Path) -> Path:
        """Write the SAELens directory (weights first, the config last, each atomically)."""
        directory = Path(directory)
        tensors = {n: p.detach().float().cpu().contiguous() for n, p in self.named_parameters()}
        with atomic_path(directory / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp))
        write_json(directory / CONFIG_FILE, self.config())
        return directory


def _architecture(cfg: dict[str, Any]) -> tuple[str, int | None]:
    """(architecture, k) from a config in the current or the older flat layout."""
    arch = cfg.get("architecture")
    act = cfg.get("activation_fn_str") or cfg.get("activation_fn")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if arch in (None, "standard") and act == "topk":
        arch = "topk"
    arch = arch or "standard"
    if arch not in ARCHITECTURES:
        raise NnobsError(f"SAE architecture {arch!r} is not supported: {', '.join(ARCHITECTURES)}")
    k = cfg.get("k", kwargs.get("k"))
    if arch == "topk" and (not isinstance(k, int) or isinstance(k, bool)):
        raise NnobsError(f"the TopK SAE's config has no integer k (got {k!r})")
    return arch, k if arch == "topk" else None


def _check_config(cfg: dict[str, Any], directory: Path) -> tuple[int, int]:
    for key in ("d_in", "d_sae"):
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise NnobsError(f"{directory / CONFIG_FILE}: {key} must be a positive integer")
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise NnobsError(
            f"{directory}: normalize_activations={norm!r} is not supported; fold the "
            "normalisation into the weights first (SAELens: fold_activation_norm_scaling_factor)"
        )
    if (cfg.get("reshape_activations") or "none") != "none" or cfg.get("hook_head_index"):
        raise NnobsError(f"{directory}: per-head SAEs are not supported")
    return cfg["d_in"], cfg["d_sae"]


def load_sae(directory: str | Path) -> SparseAutoencoder:
    """A SAELens-format directory (written by nnobs or SAELens) as a :class:`SparseAutoencoder`;
    anything missing, damaged or of another shape is one clear error."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise NnobsError(
            f"{directory} is not an SAE directory: it needs {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    cfg = read_json(directory / CONFIG_FILE, "SAE config")
    d_in, d_sae = _check_config(cfg, directory)
    arch, k = _architecture(cfg)
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    hook = meta.get("hook_name") or cfg.get("hook_name")
    if not isinstance(hook, str):
        raise NnobsError(f"{directory / CONFIG_FILE} names no hook (metadata.hook_name)")
    sae = SparseAutoencoder(
        d_in,
        d_sae,
        k,
        site=nnobs_site(hook),
        architecture=arch,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        metadata={key: v for key, v in meta.items() if key != "hook_name"},
    )
    try:
        tensors = load_file(str(directory / WEIGHTS_FILE))
    except (SafetensorError, OSError) as e:
        raise NnobsError(f"{directory / WEIGHTS_FILE} is damaged: {e}") from None
    expected = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    for name, shape in expected.items():
        got = tuple(tensors[name].shape) if name in tensors else None
        if got != shape:
            raise NnobsError(
                f"{directory / WEIGHTS_FILE}: {name} is {got}, the config says {shape}"
            )
        if not torch.isfinite(tensors[name]).all():
            raise NnobsError(f"{directory / WEIGHTS_FILE}: {name} has non-finite values")
    sae.load_state_dict({name: tensors[name].float() for name in expected})
    return sae


def check_sae_fits(sae: SparseAutoencoder, site: str, width: int) -> None:
    """Refuse an SAE trained on another site or width than the one it is applied to."""
    if sae.site != site:
        raise NnobsError(f"the SAE was trained on {sae.site}, not {site}: give --site {sae.site}")
    if sae.d_in != width:
        raise NnobsError(f"the SAE reads {sae.d_in}-wide activations, but {site} is {width} wide")


def sae_summary(sae: SparseAutoencoder, directory: str | Path | None = None) -> dict[str, Any]:
    """What a result records about the dictionary it used."""
    out = {
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "site": sae.site,
        "path": None if directory is None else str(directory),
    }
    metrics = sae.metadata.get("nnobs_metrics")
    if isinstance(metrics, dict):
        out["metrics"] = json.loads(json.dumps(metrics))
    return out
