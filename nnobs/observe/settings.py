"""The protocol's settings: every choice it makes, stored in its result so a run can be repeated."""

from __future__ import annotations

from dataclasses import dataclass, field

from nnobs.core.errors import NnobsError
from nnobs.core.fields import check_choice, check_int, check_number, is_int, is_number
from nnobs.data.windows import SAMPLINGS

# The probe's target: "rank" is the sign of the residual pcorr itself correlates (rank of loss
# on the ranks of max softmax and norm); "reference" the reference method's OLS on raw values.
LABELS = ("rank", "reference")
# The default was decided by benchmarks/bench_calibration.py: on simulated captures both labels
# hold the false-positive rate near the nominal 5%, and the reference label has at least the
# rank label's power in most settings (benchmarks/README.md has the table).
DEFAULT_LABEL = "reference"


@dataclass
class ObserveSettings:
    """Every choice the protocol makes; stored in the result so a run can be repeated."""

    ex_per_dim: int = 350
    seq_len: int | None = None
    batch_size: int = 16
    site_kind: str = "resid_post"
    layers: list[int] | None = None
    n_candidates: int = 4
    max_depth_fraction: float = 0.8
    label: str = DEFAULT_LABEL
    sampling: str = "spread"
    sweep_seed: int = 42
    seeds: list[int] = field(default_factory=lambda: list(range(43, 50)))
    flag_rates: list[float] = field(default_factory=lambda: [0.05, 0.10, 0.20, 0.30])
    n_boot: int = 1000
    random_heads: int = 100
    null_models: int = 1
    level: float = 0.05
    store_dtype: str = "float16"
    window_seed: int = 0

    def __post_init__(self) -> None:
        for name in ("ex_per_dim", "batch_size", "n_candidates", "n_boot", "random_heads"):
            check_int(name, getattr(self, name), 1)
        for name in ("sweep_seed", "window_seed", "null_models"):
            check_int(name, getattr(self, name), 0)
        if self.seq_len is not None:
            check_int("seq_len", self.seq_len, 2)
        if self.layers is not None and not (
            isinstance(self.layers, list | tuple) and all(is_int(layer) for layer in self.layers)
        ):
            raise NnobsError(f"layers must be layer indices (integers), got {self.layers!r}")
        if not isinstance(self.seeds, list | tuple) or len(self.seeds) < 2:
            raise NnobsError("the protocol needs at least 2 seeds to measure seed agreement")
        for seed in self.seeds:
            check_int("each of seeds", seed, 0)
        if len(set(self.seeds)) != len(self.seeds):
            raise NnobsError(
                f"seeds must be distinct, got {self.seeds}: probes of one seed agree with "
                "themselves, which would overstate seed agreement"
            )
        if not isinstance(self.flag_rates, list | tuple) or not all(
            is_number(rate) and 0 < rate < 1 for rate in self.flag_rates
        ):
            raise NnobsError(f"flag_rates must be fractions in (0, 1), got {self.flag_rates!r}")
        check_choice("label", self.label, LABELS)
        check_choice("sampling", self.sampling, SAMPLINGS)
        check_number("level", self.level, 0, 0.5, open_low=True)
        if self.store_dtype not in ("float16", "float32"):
            raise NnobsError(f"store_dtype must be float16 or float32, got {self.store_dtype!r}")
        check_number("max_depth_fraction", self.max_depth_fraction, 0, 1, open_low=True)

    def token_budget(self, d_model: int) -> int:
        """Scored tokens per split: ``ex_per_dim`` examples per dimension of the stream."""
        return self.ex_per_dim * d_model
