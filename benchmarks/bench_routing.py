"""Routed residuals: the cost of ``attnres`` against additive residuals, and of the analysis.

1. Training step (forward, backward, AdamW) of the default preset's shape (4 layers,
   d_model 128, vocabulary 4096, batch 32 × 128 tokens) with additive residuals and with
   ``attnres`` at 2 and 4 blocks; median over interleaved repeats.
2. Capture: a no-grad forward pass recording every layer's ``resid_post``, same models.
3. ``nnobs routing``'s analysis (``analyse_model``) of the default-size routed model: 32
   windows of 64 tokens, 2 depth bands, 1000 bootstrap resamples (the command's defaults),
   on random tokens in 16 documents (the cost does not depend on the text or the weights).

    python benchmarks/bench_routing.py [--repeats 3] [--steps 5] [--skip-analysis]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from nnobs.data.windows import Windows
from nnobs.models.adapter import nnobs_adapter
from nnobs.models.config import ModelConfig
from nnobs.models.transformer import Transformer
from nnobs.routing.result import RoutingSettings, analyse_model

BASE = ModelConfig(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, max_seq_len=128)
VARIANTS = {
    "additive": BASE,
    "attnres-2": BASE.replace(residual="attnres", attnres_blocks=2),
    "attnres-4": BASE.replace(residual="attnres", attnres_blocks=4),
}


def step_seconds(model: Transformer, ids: torch.Tensor, steps: int) -> float:
    """Median seconds of a training step (after one warm-up step)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        loss, _ = model.training_loss(ids[:, :-1], ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def capture_seconds(model: Transformer, ids: torch.Tensor, steps: int) -> float:
    """Median seconds of a no-grad forward pass capturing every layer's resid_post."""
    adapter = nnobs_adapter(model.eval())
    sites = [f"blocks.{layer}.resid_post" for layer in range(model.config.n_layers)]
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        adapter.run_with_cache(ids[:, :-1], sites)
        if i:
            times.append(time.perf_counter() - start)
    model.train()
    return statistics.median(times)


def analysis_seconds(settings: RoutingSettings) -> float:
    model = Transformer(VARIANTS["attnres-2"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".query"):
                p.normal_(0, 1)
    rng = np.random.default_rng(0)
    n, length = settings.windows, settings.window_len
    ids = rng.integers(0, BASE.vocab_size, (n, length + 1))
    docs = np.arange(n) // 2
    windows = Windows(ids[:, :-1], ids[:, 1:], np.ones((n, length), bool), docs, np.zeros(n, int))
    start = time.perf_counter()
    analyse_model(nnobs_adapter(model.eval()), "bench", windows, settings, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--skip-analysis", action="store_true")
    args = parser.parse_args()
    ids = torch.randint(0, BASE.vocab_size, (32, 129), generator=torch.Generator().manual_seed(0))
    models = {name: Transformer(cfg) for name, cfg in VARIANTS.items()}
    train: dict[str, list[float]] = {name: [] for name in models}
    capture: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):  # interleaved, so load drifts hit every variant
        for name, model in models.items():
            train[name].append(step_seconds(model, ids, args.steps))
            capture[name].append(capture_seconds(model, ids, args.steps))
    result = {"threads": torch.get_num_threads(), "variants": {}}
    for name in models:
        t, c = statistics.median(train[name]), statistics.median(capture[name])
        result["variants"][name] = {
            "params": sum(p.numel() for p in models[name].parameters()),
            "train_step_s": round(t, 4),
            "capture_s": round(c, 4),
            "train_overhead": round(t / statistics.median(train["additive"]) - 1, 4),
            "capture_overhead": round(c / statistics.median(capture["additive"]) - 1, 4),
        }
    if not args.skip_analysis:
        result["analysis_s"] = round(analysis_seconds(RoutingSettings()), 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
