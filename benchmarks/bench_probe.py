"""LinearProbe (preconditioned L-BFGS) against the reference probe solver (Adam, 20 epochs).

Synthetic activations of the protocol's shape (n = 350·d training rows, as many held out):
an anisotropic spectrum in a random basis, an offset mean and two large-magnitude
channels, as in real residual streams; the label is a noisy logistic function of one planted
direction. For each width it prints the median wall time over repeats, the speedup, the
reference objective (mean BCE + (l2/2)(|w|² + b²)) each solver reaches on the training rows,
and held-out AUC.

    .venv/bin/python benchmarks/bench_probe.py [--dims 256 512] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from reference_probe import ReferenceAdamProbe

from nnobs.measure.probes import BinaryProbe, LinearProbe

EXAMPLES_PER_DIM = 350


def synthetic(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scales = (1.0 + np.arange(d)) ** -0.5
    X = (rng.standard_normal((n, d)) * scales) @ basis.T + rng.normal(0, 1, d)
    X[:, :2] *= 10.0  # massive-activation channels
    u = rng.standard_normal(d)
    proj = (X - X.mean(0)) @ (u / np.linalg.norm(u))
    y = rng.random(n) < 1 / (1 + np.exp(-proj / proj.std()))
    return np.ascontiguousarray(X, dtype=np.float32), y.astype(np.float32)


def run(
    probe_factory: Callable[[], BinaryProbe],
    Xtr: np.ndarray,
    ytr: np.ndarray,
    Xte: np.ndarray,
    yte: np.ndarray,
    repeats: int,
) -> dict:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        probe = probe_factory().fit(Xtr, ytr)  # fit ends by copying to host: synchronised
        times.append(time.perf_counter() - t0)
    return {
        "time": statistics.median(times),
        "objective": probe.objective(Xtr, ytr),
        "auc": probe.score(Xte, yte),
        "probe": probe,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    # warm up torch kernels so the first timing is not inflated
    Xw, yw = synthetic(2000, 16, seed=1)
    LinearProbe(resample=False, device=args.device).fit(Xw, yw)
    ReferenceAdamProbe(epochs=1, device=args.device).fit(Xw, yw)

    print(f"device={args.device} torch threads={torch.get_num_threads()} repeats={args.repeats}")
    header = (
        f"{'d':>5} {'n_train':>8} {'solver':<22} {'time s':>8} {'speedup':>8} "
        f"{'objective':>11} {'AUC':>7} {'iters':>6}"
    )
    print(header)
    print("-" * len(header))
    for d in args.dims:
        n = EXAMPLES_PER_DIM * d
        X, y = synthetic(2 * n, d)
        Xtr, ytr, Xte, yte = X[:n], y[:n], X[n:], y[n:]
        ours = run(
            lambda: LinearProbe(resample=False, device=args.device),
            Xtr,
            ytr,
            Xte,
            yte,
            args.repeats,
        )
        ref = run(
            lambda: ReferenceAdamProbe(seed=42, device=args.device),
            Xtr,
            ytr,
            Xte,
            yte,
            args.repeats,
        )
        for name, r, iters in (
            ("LinearProbe (L-BFGS)", ours, str(ours["probe"].n_iter_)),
            ("ReferenceAdamProbe", ref, "-"),
        ):
            speedup = ref["time"] / r["time"]
            print(
                f"{d:>5} {n:>8} {name:<22} {r['time']:>8.3f} {speedup:>7.1f}x "
                f"{r['objective']:>11.6f} {r['auc']:>7.4f} {iters:>6}"
            )
        if ours["objective"] > ref["objective"]:
            raise SystemExit(f"d={d}: LinearProbe's objective is worse than the reference's")


if __name__ == "__main__":
    main()
