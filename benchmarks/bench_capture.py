"""Capture overhead and memory.

1. Time: capturing every layer's ``resid_post`` plus the per-token loss, max softmax and
   entropy, against a bare forward pass over the same batches whose logits are dropped.
   Median over repeats; the target is a ratio of at most 1.3.
2. Memory: peak RSS of a disk-backed capture at 350 and 1000 examples per dimension
   (tokens = ex/dim × d_model), each in a fresh process so the peaks do not mix, and of an
   in-RAM capture of the largest budget for contrast.

Runs on a randomly initialised default nnobs model (d_model 128, 4 layers, windows of 128
tokens) so it needs no trained model; ``--model PATH`` runs it on a trained run instead.

    python benchmarks/bench_capture.py [--model RUN_DIR] [--device cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from nnobs.data.windows import make_windows
from nnobs.models.adapter import ModelAdapter, nnobs_adapter
from nnobs.models.config import ModelConfig
from nnobs.models.load import load_model
from nnobs.models.transformer import Transformer
from nnobs.observe.capture import capture


def get_adapter(model: str | None, device: str) -> ModelAdapter:
    if model:
        return load_model(model, device=device)
    torch.manual_seed(0)
    return nnobs_adapter(Transformer(ModelConfig()).to(device).eval())


def random_windows(adapter: ModelAdapter, tokens: int, seq_len: int, seed: int = 0):
    """Documents of 2000 random tokens each: token ids do not change the cost of a pass."""
    rng = np.random.default_rng(seed)
    n_docs = tokens // 2000 + 2
    docs = [rng.integers(0, adapter.vocab_size, 2000) for _ in range(n_docs)]
    return make_windows(docs, seq_len, max_tokens=tokens, seed=seed)


def bare_pass(adapter: ModelAdapter, windows, batch_size: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(windows.input_ids), batch_size):
            batch = slice(first, first + batch_size)
            ids = torch.from_numpy(windows.input_ids[batch]).to(adapter.device)
            mask = torch.from_numpy(windows.valid[batch]).to(adapter.device).long()
            adapter.forward(ids, mask)
    if adapter.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def timed_capture(adapter: ModelAdapter, windows, sites, batch_size: int) -> float:
    start = time.perf_counter()
    capture(adapter, windows, sites, batch_size=batch_size, progress=False)
    return time.perf_counter() - start


def time_overhead(args) -> dict:
    adapter = get_adapter(args.model, args.device)
    tokens = args.ex_per_dim * adapter.d_model
    windows = random_windows(adapter, tokens, args.seq_len)
    sites = [adapter.site_name(layer) for layer in range(adapter.n_layers)]
    bare_pass(adapter, windows, args.batch_size)  # warm-up
    timed_capture(adapter, windows, sites, args.batch_size)
    bare, captured = [], []
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits both
        bare.append(bare_pass(adapter, windows, args.batch_size))
        captured.append(timed_capture(adapter, windows, sites, args.batch_size))
    b, c = statistics.median(bare), statistics.median(captured)
    return {"tokens": tokens, "sites": len(sites), "bare_s": b, "capture_s": c, "ratio": c / b}


def memory_child(args) -> None:
    """One capture in this (fresh) process; prints its memory figures as JSON."""
    adapter = get_adapter(args.model, args.device)
    tokens = args.memory_child * adapter.d_model
    windows = random_windows(adapter, tokens, args.seq_len)
    sites = [adapter.site_name(layer) for layer in range(adapter.n_layers)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as tmp:
        directory = None if args.in_ram else tmp
        cap = capture(
            adapter,
            windows,
            sites,
            batch_size=args.batch_size,
            directory=directory,
            progress=False,
        )
        stats = cap.stats
    print(
        json.dumps(
            {
                "ex_per_dim": args.memory_child,
                "mode": "RAM" if args.in_ram else "disk",
                "tokens": tokens,
                "rss_before_capture_mb": round(before, 1),
                "peak_rss_mb": stats["peak_rss_mb"],
                "on_disk_mb": round(stats["bytes_on_disk"] / 2**20, 1),
                "capture_s": stats["seconds"],
            }
        )
    )


def measure_memory(args, ex_per_dim: int, in_ram: bool = False) -> dict:
    command = [
        sys.executable,
        __file__,
        "--memory-child",
        str(ex_per_dim),
        "--device",
        args.device,
        "--seq-len",
        str(args.seq_len),
        "--batch-size",
        str(args.batch_size),
        *(["--threads", str(args.threads)] if args.threads else []),
        *(["--in-ram"] if in_ram else []),
    ]
    if args.model:
        command += ["--model", args.model]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="nnobs run directory or Hugging Face model path")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--ex-per-dim", type=int, default=350, help="tokens per d_model (timing)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-budgets", type=int, nargs="*", default=[350, 1000])
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--in-ram", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return

    t = time_overhead(args)
    print(
        f"device {args.device}, torch threads {torch.get_num_threads()}, median of {args.repeats}"
    )
    print(f"{'tokens':>8} {'sites':>5} {'bare s':>8} {'capture s':>9} {'ratio':>6}")
    print(
        f"{t['tokens']:>8} {t['sites']:>5} {t['bare_s']:>8.3f} {t['capture_s']:>9.3f} "
        f"{t['ratio']:>6.2f}  (target <= 1.30)"
    )
    if args.memory_budgets:
        print()
        print(
            f"{'ex/dim':>6} {'tokens':>8} {'arrays':>6} {'peak RSS before MB':>18} "
            f"{'peak RSS MB':>11} {'on disk MB':>10}"
        )
        runs = [(ex, False) for ex in args.memory_budgets] + [(max(args.memory_budgets), True)]
        for ex, in_ram in runs:
            m = measure_memory(args, ex, in_ram)
            print(
                f"{ex:>6} {m['tokens']:>8} {m['mode']:>6} {m['rss_before_capture_mb']:>18.1f} "
                f"{m['peak_rss_mb']:>11.1f} {m['on_disk_mb']:>10.1f}"
            )


if __name__ == "__main__":
    main()
