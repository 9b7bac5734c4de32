"""Training throughput of the nnobs trainer against a bare PyTorch loop.

Both train the same model (a preset's) with the same AdamW settings, gradient clipping,
batch shape and token stream; the bare loop samples windows with ``torch.randint`` and
synchronises only every ``log_every`` steps, as a hand-written loop would. Throughput is
measured over logging intervals after the first (warm-up), evaluation and checkpointing
excluded; the table shows the median over repeats, interleaved so load drifts hit both.

    python benchmarks/bench_train.py --preset default --steps 60 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nnobs.core.rundir import read_metrics
from nnobs.data.corpus import load_corpus
from nnobs.data.encoding import token_stream
from nnobs.data.tokenizer import get_tokenizer
from nnobs.models.transformer import Transformer
from nnobs.training.config import TrainConfig
from nnobs.training.runconfig import load_run_config
from nnobs.training.trainer import train


def trainer_throughput(mc, tc: TrainConfig, out: Path) -> float:
    far = tc.steps + 1  # no evaluation or checkpoint inside the measured steps
    cfg = tc.replace(eval_every=far, first_checkpoint=far, checkpoint_every=far)
    train(mc, cfg, out, progress=False, overwrite=True)
    records = [r for r in read_metrics(out) if "tokens_per_s" in r][1:]  # skip warm-up
    tokens = seconds = 0.0
    previous = cfg.log_every
    for r in records:
        n = (r["step"] - previous) * cfg.batch_size * cfg.seq_len
        tokens, seconds = tokens + n, seconds + n / r["tokens_per_s"]
        previous = r["step"]
    return tokens / seconds


def bare_throughput(mc, tc: TrainConfig, stream: torch.Tensor) -> float:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(tc.seed)
    model = Transformer(mc).to(device)
    opt = torch.optim.AdamW(
        model.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay
    )
    stream = stream.to(device)
    offsets = torch.arange(tc.seq_len + 1, device=device)
    tokens = seconds = 0.0
    start = time.perf_counter()
    for step in range(tc.steps):
        starts = torch.randint(0, len(stream) - tc.seq_len, (tc.batch_size, 1), device=device)
        window = stream[starts + offsets].long()
        loss, _ = model.training_loss(window[:, :-1], window[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % tc.log_every == 0:
            loss.item()
            now = time.perf_counter()
            if step + 1 > tc.log_every:  # the first interval is warm-up
                tokens += tc.log_every * tc.batch_size * tc.seq_len
                seconds += now - start
            start = now
    return tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    mc, tc = load_run_config(args.preset)
    tc = tc.replace(steps=args.steps, log_every=10)
    corpus = load_corpus(tc.corpus, max_chars=tc.max_chars)
    stream = torch.from_numpy(
        token_stream(corpus.train, get_tokenizer(tc.tokenizer, corpus, mc.vocab_size))
    )
    results: dict[str, list[float]] = {"bare PyTorch loop": [], "nnobs trainer": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            results["bare PyTorch loop"].append(bare_throughput(mc, tc, stream))
            results["nnobs trainer"].append(trainer_throughput(mc, tc, Path(tmp) / "run"))
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"preset {args.preset}, {args.steps} steps x {tc.batch_size}x{tc.seq_len} tokens, "
          f"{device}, median of {args.repeats}")  # fmt: skip
    base = statistics.median(results["bare PyTorch loop"])
    print(f"{'loop':<20} {'tokens/s':>10} {'ratio':>7}   runs")
    for name, values in results.items():
        median = statistics.median(values)
        runs = " ".join(f"{v:.0f}" for v in values)
        print(f"{name:<20} {median:>10.0f} {median / base:>7.3f}   {runs}")


if __name__ == "__main__":
    main()
