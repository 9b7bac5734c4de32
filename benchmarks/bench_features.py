"""Feature dashboards and SAEs: speed, memory and quality.

1. Streamed dashboards: the one pass that keeps every feature's top-k contexts, quantile
   sample, density and mean (``stream_pass``) for all features of a site, against a bare
   capture of the same site (activations streamed to disk, ``observe.capture``) over the same
   windows; tokens per second of each, median of ``--repeats`` interleaved runs.
2. Memory: peak RSS of the streamed pass at 10⁵ and 10⁶ tokens, each in a fresh process (the
   tables are (features × k), so the peak should not grow with the tokens).
3. SAE: training throughput (tokens/s, model forward passes included) of the default TopK SAE
   (8 × d_model features, k 16, 200 000 tokens) on a site of the model, and its variance
   explained, L0 and spliced-in loss on held-out test windows.

Without ``--model`` a randomly initialised default model is used: its speed and memory are a
trained model's, its SAE quality is meaningless (give ``--model runs/default`` for that).

    python benchmarks/bench_features.py [--model RUN] [--site blocks.1.mlp_hidden]
        [--sae-site blocks.2.resid_post] [--tokens 100000] [--memory 100000 1000000]
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

import torch

from nnobs.data.windows import make_windows
from nnobs.features.dashboard import DashboardSettings, stream_pass
from nnobs.features.sae_eval import evaluate_sae
from nnobs.features.sources import neuron_source
from nnobs.features.stream import budget_windows
from nnobs.features.train_sae import SAESettings, train_site_sae
from nnobs.models.adapter import ModelAdapter, nnobs_adapter
from nnobs.models.config import ModelConfig
from nnobs.models.load import load_model
from nnobs.models.transformer import Transformer
from nnobs.observe.capture import capture


def get_adapter(model: str | None) -> ModelAdapter:
    if model:
        return load_model(model)
    torch.manual_seed(0)
    return nnobs_adapter(Transformer(ModelConfig()).eval())


def random_windows(adapter: ModelAdapter, tokens: int, seq_len: int = 128):
    """Documents of 2000 random tokens: token ids do not change the cost of a pass."""
    import numpy as np

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, adapter.vocab_size, 2000) for _ in range(tokens // 2000 + 2)]
    return make_windows(docs, seq_len, max_tokens=tokens, seed=0)


def speed(args) -> dict:
    adapter = get_adapter(args.model)
    windows = random_windows(adapter, args.tokens)
    source = neuron_source(adapter, args.site)
    settings = DashboardSettings()
    streamed, bare = [], []
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits both
        start = time.perf_counter()
        stream_pass(adapter, source, windows, settings)
        streamed.append(time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            capture(adapter, windows, [args.site], directory=tmp, progress=False)
            bare.append(time.perf_counter() - start)
    s, b = statistics.median(streamed), statistics.median(bare)
    return {
        "site": args.site,
        "features": source.n_features,
        "tokens": windows.n_tokens,
        "streamed_tokens_per_s": round(windows.n_tokens / s),
        "bare_capture_tokens_per_s": round(windows.n_tokens / b),
        "time_ratio": round(s / b, 2),
    }


def memory_child(args) -> None:
    """One streamed pass in this process; prints its peak RSS (MiB) as JSON."""
    adapter = get_adapter(args.model)
    windows = random_windows(adapter, args.child_tokens)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    stream_pass(adapter, neuron_source(adapter, args.site), windows, DashboardSettings())
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"tokens": windows.n_tokens, "rss_before_pass_mib": round(before),
              "peak_rss_mib": round(peak), "seconds": round(seconds, 1)}  # fmt: skip
    print(json.dumps(result))


def memory(args) -> list[dict]:
    out = []
    for tokens in args.memory:
        cmd = [sys.executable, __file__, "--child-tokens", str(tokens), "--site", args.site]
        if args.model:
            cmd += ["--model", args.model]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        out.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


def sae(args) -> dict:
    adapter = get_adapter(args.model)
    settings = SAESettings()
    if args.model:
        train = budget_windows(adapter, "stdlib", "train", settings.tokens, 128)
        test = budget_windows(adapter, "stdlib", "test", 8192, 128)
    else:
        train, test = random_windows(adapter, settings.tokens), random_windows(adapter, 8192)
    start = time.perf_counter()
    trainer = train_site_sae(adapter, args.sae_site, train, settings)
    seconds = time.perf_counter() - start
    quality = evaluate_sae(adapter, trainer.sae_, test, n_boot=200)
    loss = quality["loss"]
    return {
        "site": args.sae_site,
        "d_sae": trainer.sae_.d_sae,
        "k": settings.k,
        "tokens_trained": trainer.n_tokens_,
        "train_tokens_per_s": round(trainer.n_tokens_ / seconds),
        "dead_fraction_training": round(trainer.dead_fraction_, 4),
        "variance_explained": round(quality["variance_explained"], 4),
        "l0": round(quality["l0"], 2),
        "dead_fraction_test": round(quality["dead_fraction"], 4),
        "loss_clean": round(loss["clean"], 4),
        "loss_spliced": round(loss["spliced"], 4),
        "loss_mean_ablated": round(loss["mean_ablated"], 4),
        "loss_recovered": None if loss["recovered"] is None else round(loss["recovered"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a trained run (default: random-init default model)")
    parser.add_argument("--site", default="blocks.1.mlp_hidden", help="dashboard site")
    parser.add_argument("--sae-site", default="blocks.2.resid_post", help="SAE site")
    parser.add_argument("--tokens", type=int, default=100_000, help="tokens for the speed test")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--skip", nargs="*", default=[], choices=["speed", "memory", "sae"])
    parser.add_argument("--child-tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_tokens:
        memory_child(args)
        return
    result = {"torch_threads": torch.get_num_threads()}
    for name, fn in (("speed", speed), ("memory", memory), ("sae", sae)):
        if name not in args.skip:
            result[name] = fn(args)
            print(json.dumps({name: result[name]}), file=sys.stderr)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
