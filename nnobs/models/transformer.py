"""A decoder-only transformer whose architecture is the knobs of :class:`ModelConfig`.

Every activation nnobs measures passes through a :class:`HookPoint`, an identity module
placed at a named site (the kinds are listed in :mod:`nnobs.models.sites`; see
:meth:`Transformer.hook_points`). Capture and intervention attach ordinary PyTorch forward
hooks to those modules, so the model itself never knows it is being observed and an unhooked
forward pass costs nothing extra.

The residual path is a strategy, :class:`ResidualPath`, chosen by ``config.residual``. With
``residual="none"`` or post-norm there is no plain running sum; ``resid_pre``/``resid_post``
are then simply the block's input and output.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nnobs.models.activation_sparsity import keep_top_channels
from nnobs.models.attnres import AttnResidual
from nnobs.models.config import ModelConfig
from nnobs.models.hooks import HookPoint
from nnobs.models.init import init_weights, layer_defaults_from
from nnobs.models.sites import LAYER_SITE_KINDS


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned gain (no centring, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(config: ModelConfig) -> nn.Module:
    """The norm ``config.norm`` names (an identity for ``"none"``)."""
    if config.norm == "layernorm":
        return nn.LayerNorm(config.d_model, bias=config.bias)
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model)
    return nn.Identity()


def rope_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines of the rotary angles, (max_seq_len, head_dim / 2) each."""
    half = config.head_dim // 2
    inv_freq = config.rope_base ** (-torch.arange(half, dtype=torch.float32) / half)
    angles = torch.outer(torch.arange(config.max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head's channels; x is (b, h, t, d)."""
    t = x.shape[-2]
    cos, sin = cos[:t].to(x.dtype), sin[:t].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    """Causal self-attention, grouped-query when there are fewer key/value heads."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.d_head = config.n_heads, config.kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.d_model, self.n_heads * self.d_head, bias=config.bias)
        self.k_proj = nn.Linear(config.d_model, self.n_kv * self.d_head, bias=config.bias)
        self.v_proj = nn.Linear(config.d_model, self.n_kv * self.d_head, bias=config.bias)
        self.o_proj = nn.Linear(self.n_heads * self.d_head, config.d_model, bias=config.bias)
        self.rope = config.positions == "rope"
        self.act_keep = config.act_keep
        # A learned logit per head on a key slot of value zero (attending to nothing).
        self.sink = nn.Parameter(torch.zeros(self.n_heads)) if config.attn_sinks else None
        self.hook_pattern = HookPoint()
        self.hook_head_out = HookPoint()

    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        return self.q_proj, self.k_proj, self.v_proj

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (keep_top_channels(p(x), self.act_keep) for p in self.projections())
        q = q.view(b, t, self.n_heads, self.d_head).transpose(1, 2)
        k = k.view(b, t, self.n_kv, self.d_head).transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.d_head).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.n_kv != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        if self.hook_pattern._forward_hooks or self.sink is not None:
            # Someone observes or edits the pattern, or a sink takes part of it: materialise it
            # (the fused kernel never does).
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.d_head)
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            pattern = self.hook_pattern(self.softmax(scores.masked_fill(~causal, float("-inf"))))
            out = pattern @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        heads = self.hook_head_out(out.transpose(1, 2))  # (b, t, heads, d_head)
        return self.o_proj(heads.reshape(b, t, self.n_heads * self.d_head))

    def softmax(self, scores: torch.Tensor) -> torch.Tensor:
        """Attention weights over the keys; with a sink, the share it takes is left out."""
        if self.sink is None:
            return scores.softmax(-1)
        sink = self.sink.view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        return torch.cat([scores, sink.to(scores.dtype)], -1).softmax(-1)[..., :-1]


class MLP(nn.Module):
    """The feed-forward sublayer: up-projection, activation (gated for SwiGLU), down-projection."""

    def __init__(self, config: ModelConfig, width: int) -> None:
        super().__init__()
        self.gated = config.activation == "swiglu"
        self.up = nn.Linear(config.d_model, width, bias=config.bias)
        self.gate = nn.Linear(config.d_model, width, bias=config.bias) if self.gated else None
        self.down = nn.Linear(width, config.d_model, bias=config.bias)
        self.act = {"relu": F.relu, "gelu": F.gelu, "swiglu": F.silu}[config.activation]
        self.act_keep = config.act_keep
        self.hook_hidden = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.gate(x)) * self.up(x) if self.gated else self.act(self.up(x))
        return self.down(self.hook_hidden(keep_top_channels(hidden, self.act_keep)))


class ResidualPath(nn.Module):
    """How a sublayer's input is formed from the stream and how its output joins it.

    ``config.residual`` picks one from :data:`RESIDUAL_PATHS`. When a strategy sets
    ``uses_sources``, the block loop hands :meth:`read` every tensor written so far (the
    embedding, then each sublayer's output in order): a routed residual such as ``attnres``,
    whose sublayers read a learned mix of all earlier outputs, is one more subclass that
    overrides :meth:`read` (its parameters live on the strategy, one per block).
    """

    uses_sources = False

    @classmethod
    def for_layer(cls, config: ModelConfig, layer: int) -> ResidualPath:
        """The strategy of ``layer`` (stateless strategies ignore both)."""
        return cls()

    def hook_points(self) -> dict[str, HookPoint]:
        """Sites the strategy adds to its block (the routing weights of a routed residual)."""
        return {}

    def read(self, stream: torch.Tensor, sources: list[torch.Tensor] | None) -> torch.Tensor:
        """The next sublayer's input (before its norm)."""
        return stream

    def write(self, stream: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The stream once a sublayer's output ``out`` has joined it."""
        raise NotImplementedError


class AddResidual(ResidualPath):
    """The standard residual stream: each sublayer adds its output to a running sum."""

    def write(self, stream: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return stream + out


class NoResidual(ResidualPath):
    """No skip connection: each sublayer's output replaces the stream."""

    def write(self, stream: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out


# AttnResidual (its own module, :mod:`nnobs.models.attnres`) follows the ResidualPath interface.
RESIDUAL_PATHS: dict[str, type[ResidualPath] | type[AttnResidual]] = {
    "add": AddResidual,
    "none": NoResidual,
    "attnres": AttnResidual,
}


class Block(nn.Module):
    """Attention then MLP, each a sublayer joined to the stream by the residual strategy."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.pre = config.norm_placement == "pre"
        self.residual = RESIDUAL_PATHS[config.residual].for_layer(config, layer)
        self.norm1, self.norm2 = make_norm(config), make_norm(config)
        self.attn = Attention(config)
        self.mlp = MLP(config, config.mlp_widths[layer])
        self.act_keep = config.act_keep
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def hook_points(self) -> dict[str, HookPoint]:
        """This block's sites by kind."""
        return {
            "resid_pre": self.hook_resid_pre,
            "attn_pattern": self.attn.hook_pattern,
            "head_out": self.attn.hook_head_out,
            "attn_out": self.hook_attn_out,
            "resid_mid": self.hook_resid_mid,
            "mlp_hidden": self.mlp.hook_hidden,
            "mlp_out": self.hook_mlp_out,
            "resid_post": self.hook_resid_post,
            **self.residual.hook_points(),
        }

    def _sublayer(
        self,
        x: torch.Tensor,
        norm: nn.Module,
        fn: Callable[[torch.Tensor], torch.Tensor],
        hook: HookPoint,
        sources: list[torch.Tensor] | None,
    ) -> torch.Tensor:
        h = self.residual.read(x, sources)
        sub_in = keep_top_channels(norm(h) if self.pre else h, self.act_keep)
        out = hook(keep_top_channels(fn(sub_in), self.act_keep))
        if sources is not None:
            sources.append(out)
        x = self.residual.write(x, out)
        return x if self.pre else norm(x)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        sources: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The stream after this block; ``sources`` (if kept) gains its two sublayer outputs."""
        x = self.hook_resid_pre(x)
        x = self._sublayer(x, self.norm1, lambda h: self.attn(h, rope), self.hook_attn_out, sources)
        x = self.hook_resid_mid(x)
        x = self._sublayer(x, self.norm2, self.mlp, self.hook_mlp_out, sources)
        return self.hook_resid_post(x)


class Transformer(nn.Module):
    """The model: embedding, blocks, final norm and unembedding (nanoGPT's shape).

    Weights are initialised by :func:`~nnobs.models.init.init_weights` from ``generator``, or
    from torch's global generator when it is None; a generator seeded with ``s`` gives the
    same weights as ``torch.manual_seed(s)`` followed by ``Transformer(config)``.
    """

    def __init__(self, config: ModelConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        with layer_defaults_from(generator):
            self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
            self.pos_emb = (
                nn.Embedding(config.max_seq_len, config.d_model)
                if config.positions == "learned"
                else None
            )
            self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layers))
            # Post-norm blocks already end in a norm; a final norm only makes sense for pre-norm.
            self.final_norm = make_norm(config) if config.norm_placement == "pre" else nn.Identity()
            self.unembed = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.unembed.weight = self.tok_emb.weight
        self.hook_embed = HookPoint()
        self.hook_final = HookPoint()
        if config.positions == "rope":
            cos, sin = rope_tables(config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        init_weights(self, generator)

    def hook_points(self) -> dict[str, HookPoint]:
        """Every named site of the model, in forward order."""
        sites: dict[str, HookPoint] = {"embed": self.hook_embed}
        for layer, block in enumerate(self.blocks):
            points = block.hook_points()
            kinds = [kind for kind in LAYER_SITE_KINDS if kind in points]
            sites.update((f"blocks.{layer}.{kind}", points[kind]) for kind in kinds)
        sites["final"] = self.hook_final
        return sites

    def _rope(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (self.rope_cos, self.rope_sin) if self.config.positions == "rope" else None

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (batch, pos) → the embedded stream (tokens plus learned positions)."""
        t = idx.shape[1]
        if t > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {t} tokens exceeds max_seq_len={self.config.max_seq_len}"
            )
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(t, device=idx.device))
        return self.hook_embed(x)

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and unembedding: stream → logits."""
        return self.unembed(self.hook_final(self.final_norm(x)))

    def _run_blocks(
        self, idx: torch.Tensor, readout_layer: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The one block loop: the stream after the last block, and the logits read out after
        block ``readout_layer`` (final norm and unembedding, not through the ``final`` site;
        None when not asked for)."""
        x = self.embed(idx)
        sources = [x] if any(block.residual.uses_sources for block in self.blocks) else None
        early_logits = None
        for layer, block in enumerate(self.blocks):
            x = block(x, self._rope(), sources)
            if layer == readout_layer:
                # Read out here, not after the loop: the order the graph is built in sets the
                # order backward sums gradients in, and so the last bits of trained weights.
                early_logits = self.unembed(self.final_norm(x))
        return x, early_logits

    def stream(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (batch, pos) → the residual stream after the last block."""
        return self._run_blocks(idx)[0]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (batch, pos) → next-token logits (batch, pos, vocab)."""
        return self.readout(self.stream(idx))

    def training_loss(
        self, idx: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Next-token cross-entropy, plus the intermediate-supervision term when configured.

        Returns the loss to optimise and its parts (``lm_loss`` always, ``aux_loss`` if used).
        """
        cfg = self.config
        x, aux_logits = self._run_blocks(idx, cfg.aux_layer if cfg.aux_weight > 0 else None)
        logits = self.readout(x)
        lm_loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        parts = {"lm_loss": lm_loss}
        if aux_logits is None:
            return lm_loss, parts
        parts["aux_loss"] = F.cross_entropy(aux_logits.flatten(0, 1).float(), targets.flatten())
        return lm_loss + cfg.aux_weight * parts["aux_loss"], parts
