"""Weight initialisation, drawn from an explicit random generator."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

# Output projections of the sublayers: each writes into the residual stream, so GPT-2 scales
# their initial weights down with depth to keep the stream's variance from growing.
_OUTPUT_PROJECTIONS = ("o_proj.weight", "down.weight")


def init_weights(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """GPT-2 initialisation of an nnobs Transformer: matrices N(0, 0.02), output projections
    N(0, 0.02 / sqrt(2 · n_layers)), biases zero; vectors (norm gains) are left as built.

    Draws come from ``generator`` (a CPU generator for a model on the CPU), or from torch's
    global generator when it is None.
    """
    out_std = 0.02 / math.sqrt(2 * model.config.n_layers)
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue
        std = out_std if name.endswith(_OUTPUT_PROJECTIONS) else 0.02
        nn.init.normal_(p, 0.0, std, generator=generator)
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


@contextmanager
def layer_defaults_from(generator: torch.Generator | None) -> Iterator[None]:
    """Within the block, PyTorch layers draw their default initialisation from ``generator``.

    Layers draw a default initialisation from torch's global generator as they are built;
    :func:`init_weights` overwrites it, but those draws advance the stream it continues from.
    Taking them from ``generator`` too (the global generator is left as it was) is what makes
    a generator seeded with ``s`` give the weights ``torch.manual_seed(s)`` gave.
    """
    if generator is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(generator.get_state())
        yield
        generator.set_state(torch.get_rng_state())
