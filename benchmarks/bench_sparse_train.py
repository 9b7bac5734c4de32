"""Weight-sparse training step time against the dense step of the same shape.

Builds the model of a preset (default ``sparse``: 4 layers, d_model 128, 2048-token
vocabulary, untied embeddings) with random weights and times optimiser steps on random
tokens of the preset's batch shape: the dense step (forward, backward, gradient-RMS cap,
AdamW) and the same step followed by the sparsity hook at the preset's final kept fraction
(every matrix keeps its largest entries, each row and column at least ``min_nonzero``).
Dense and sparse steps alternate, so a machine shared with other jobs slows both alike.
The figure is ``ratio``: the median over sparse steps of (whole step) / (the same step
before the hook), which drifting load cannot bias; the medians of the plain dense and
sparse steps are printed beside it.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_sparse_train.py --steps 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from nnobs.models.transformer import Transformer
from nnobs.training.runconfig import load_run_config
from nnobs.training.sparsity import WeightSparsity
from nnobs.training.trainer import build_optimizer, normalise_grad_rms_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="sparse")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each kind")
    args = parser.parse_args()
    mc, tc = load_run_config(args.preset, None, [])
    tc = tc.replace(keep_anneal=[0.0, 0.0])  # the final kept fraction from the first step
    model = Transformer(mc, generator=torch.Generator().manual_seed(0)).train()
    optimizer = build_optimizer(model, tc, torch.device("cpu"))
    hook = WeightSparsity(tc)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, mc.vocab_size, (tc.batch_size, tc.seq_len + 1), generator=gen)

    def step(sparse: bool) -> tuple[float, float]:
        start = time.perf_counter()
        loss, _ = model.training_loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        normalise_grad_rms_(params)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dense_part = time.perf_counter() - start
        if sparse:
            hook.on_step(model, optimizer, tc.steps)
        return time.perf_counter() - start, dense_part

    step(True)  # warm-up
    dense, sparse, hook_only, ratios = [], [], [], []
    for _ in range(args.steps):
        dense.append(step(False)[0])
        total, before_hook = step(True)
        sparse.append(total)
        hook_only.append(total - before_hook)
        ratios.append(total / before_hook)
    result = {
        "preset": args.preset,
        "threads": torch.get_num_threads(),
        "batch": [tc.batch_size, tc.seq_len],
        "kept_fraction": tc.weight_keep,
        "min_nonzero": tc.min_nonzero,
        "dense_step_s": round(statistics.median(dense), 4),
        "sparse_step_s": round(statistics.median(sparse), 4),
        "hook_s": round(statistics.median(hook_only), 4),
        "ratio": round(statistics.median(ratios), 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
