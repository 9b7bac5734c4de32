"""Growing a model: time and exactness on the default preset's architecture.

The default run preset's model (4 layers × 128 wide, 4 heads, 4096-token vocabulary) is
grown into the published study's kind of large model (here 6 layers, 8 heads at the same
head dimension, MLP 768), once per growth kind, from weights moved off their initial values.
For each it prints (as JSON) the median time of ``grow_model`` over repeats and the largest absolute
logit difference between the small and the grown model on random token windows (float32, CPU).

    .venv/bin/python benchmarks/bench_seeding.py [--repeats 5] [--windows 16]
    .venv/bin/python benchmarks/bench_seeding.py --calibration 1000

``--calibration N`` instead simulates N gap studies (5 seeds unless ``--seeds``, the
default preset's checkpoint schedule, exponential decay plus per-seed offsets and noise)
for each planted truth and prints how often the declared analysis calls each verdict.

The seeding experiment's wall time is measured by running it (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from nnobs.models.transformer import Transformer
from nnobs.seeding.analysis import VERDICTS, analyse_gap
from nnobs.seeding.grow import GrowthPlan, grow_model, max_logit_difference
from nnobs.training.runconfig import load_run_config
from nnobs.training.schedule import checkpoint_steps

GROWTHS = {
    "more layers (4 -> 6)": dict(n_layers=6),
    "more heads (4 -> 8, d_head 32)": dict(n_heads=8, d_head=32),
    "wider MLPs (512 -> 768)": dict(d_mlp=768),
    "all three": dict(n_layers=6, n_heads=8, d_head=32, d_mlp=768),
}


TRUTHS = {  # asymptote, amplitude of the early gap
    "absent (no gap)": (0.0, 0.0),
    "decays to 0": (0.0, 0.15),
    "persists at 0.02": (0.02, 0.15),
    "persists at 0.04": (0.04, 0.15),
}


def calibration(n: int, seeds: int) -> None:
    """Verdict counts of the declared analysis on simulated studies with a known truth."""
    steps = np.array(checkpoint_steps(400, 8, 64))
    counts = {}
    for name, (asymptote, amplitude) in TRUTHS.items():
        verdicts = []
        for i in range(n):
            rng = np.random.default_rng([i, seeds])
            curve = asymptote + amplitude * np.exp(-steps / 60)
            gaps = (
                curve + rng.normal(0, 0.01, (seeds, 1)) + rng.normal(0, 0.01, (seeds, len(steps)))
            )
            verdicts.append(analyse_gap(gaps, steps, n_boot=1000)["verdict"])
        counts[name] = {v: verdicts.count(v) / n for v in VERDICTS}
    print(json.dumps({"studies": n, "seeds": seeds, "rates": counts}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calibration", type=int, metavar="N", help="simulate N studies")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per simulated study")
    args = parser.parse_args()
    if args.calibration:
        calibration(args.calibration, args.seeds)
        return
    torch.set_num_threads(args.threads)
    small_cfg, train_cfg = load_run_config("default")
    small = Transformer(small_cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # trained-like weights: every parameter away from its init value
        for p in small.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    tokens = torch.randint(
        0, small_cfg.vocab_size, (args.windows, train_cfg.seq_len),
        generator=torch.Generator().manual_seed(2),
    )  # fmt: skip
    rows = []
    for name, knobs in GROWTHS.items():
        plan = GrowthPlan.of(small_cfg, small_cfg.replace(**knobs))
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            grown = grow_model(small, plan, seed=0)
            times.append(time.perf_counter() - t0)
        rows.append({
            "growth": name,
            "grow_s": round(statistics.median(times), 4),
            "max_logit_difference": max_logit_difference(small, grown, tokens),
        })  # fmt: skip
    small_shape = f"{small_cfg.n_layers} layers x {small_cfg.d_model}, {small_cfg.n_heads} heads"
    print(json.dumps({"small": small_shape, "tokens": tokens.numel(), "growths": rows}, indent=1))


if __name__ == "__main__":
    main()
