"""The protocol's settings: every choice it makes, stored in its result so a run can be repeated."""

from __future__ import annotations

from dataclasses import dataclass, field

from nnobs.core.errors import NnobsError


@dataclass
class ObserveSettings:
    """Every choice the protocol makes; stored in the result so a run can be repeated."""

    ex_per_dim: int = 350
    seq_len: int | None = None
    batch_size: int = 16
    site_kind: str = "resid_post"
    layers: list[int] | None = None
    n_candidates: int = 3
    max_depth_fraction: float = 0.8
    sweep_seed: int = 42
    seeds: list[int] = field(default_factory=lambda: list(range(43, 50)))
    flag_rates: list[float] = field(default_factory=lambda: [0.05, 0.10, 0.20, 0.30])
    n_boot: int = 1000
    random_heads: int = 100
    random_init_floor: bool = True
    store_dtype: str = "float16"
    window_seed: int = 0

    def __post_init__(self) -> None:
        if self.ex_per_dim < 1:
            raise NnobsError(f"ex_per_dim must be a positive integer, got {self.ex_per_dim}")
        if len(self.seeds) < 2:
            raise NnobsError("the protocol needs at least 2 seeds to measure seed agreement")
        if self.store_dtype not in ("float16", "float32"):
            raise NnobsError(f"store_dtype must be float16 or float32, got {self.store_dtype!r}")
        if not 0 < self.max_depth_fraction <= 1:
            raise NnobsError("max_depth_fraction must be in (0, 1]")

    def token_budget(self, d_model: int) -> int:
        """Scored tokens per split: ``ex_per_dim`` examples per dimension of the stream."""
        return self.ex_per_dim * d_model
