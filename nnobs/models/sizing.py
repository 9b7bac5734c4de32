"""Parameter counting and matching: the sizes an architecture study holds equal."""

from __future__ import annotations

from nnobs.core.errors import NnobsError
from nnobs.models.config import ModelConfig


def count_params(config: ModelConfig) -> int:
    """Exact number of trainable parameters, counted on the meta device (no memory used)."""
    import torch

    from nnobs.models.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(config)
    return sum(p.numel() for p in model.parameters())


def match_params(
    config: ModelConfig, target: ModelConfig | int, knob: str = "d_mlp", tolerance: float = 0.01
) -> ModelConfig:
    """Return ``config`` with one width changed so its parameter count matches ``target``.

    ``knob`` is ``"d_mlp"`` (every layer's MLP width scaled together, keeping a bottleneck's
    shape) or ``"d_model"`` (kept a multiple of the head count). Raises if no width gets
    within ``tolerance`` (relative).
    """
    goal = target if isinstance(target, int) else count_params(target)
    if knob == "d_mlp":
        base = config.mlp_widths
        ref = max(base)

        def build(width: int) -> ModelConfig:
            if isinstance(config.d_mlp, list):
                return config.replace(d_mlp=[max(1, round(w * width / ref)) for w in base])
            return config.replace(d_mlp=width)

        step = 1
    elif knob == "d_model":
        step = config.n_heads * (2 if config.positions == "rope" else 1)

        def build(width: int) -> ModelConfig:
            mlp = config.d_mlp
            return config.replace(d_model=width * step, d_mlp=mlp)

    else:
        raise NnobsError(f"cannot match parameters by {knob!r}: use d_mlp or d_model")

    lo, hi = 1, 1
    while count_params(build(hi)) < goal:
        lo, hi = hi, hi * 2
        if hi > 1 << 20:
            raise NnobsError(f"no {knob} reaches {goal} parameters")
    while hi - lo > 1:  # parameter count grows monotonically with width
        mid = (lo + hi) // 2
        if count_params(build(mid)) < goal:
            lo = mid
        else:
            hi = mid
    best = min((build(lo), build(hi)), key=lambda c: abs(count_params(c) - goal))
    error = abs(count_params(best) - goal) / goal
    if error > tolerance:
        raise NnobsError(
            f"matching by {knob} gets only within {error:.1%} of {goal} parameters "
            f"(tolerance {tolerance:.0%}); match by the other width instead"
        )
    return best
