"""Observability over training: what live observation costs, and what sharing saves.

**Live overhead.** The same run is trained twice from scratch, without and with
:class:`nnobs.callback.ObservabilityCallback` (default settings and budget), at the preset's
checkpoint schedule. Printed: both wall times and their ratio (target: ≤ 10% more), and the
callback's own account (seconds observing / seconds training in the observed run), which
does not depend on the two runs meeting the same machine load.

**Post hoc sharing.** On the plain run, every checkpoint is observed

1. by :func:`nnobs.observe.trajectory.observe_run` (corpus, splits, tokenizer, windows and floor
   made once; step 0 is the random-init null model);
2. by one ``observe_run(steps=[s])`` call per checkpoint: the same tracked subset and settings,
   but each call loads the corpus, cuts its windows and measures its own random-init floor;
3. by one ``nnobs observe --model RUN/checkpoints/step_S --domain2 none`` process per
   checkpoint: the full protocol at its defaults (cross-domain transfer left out, which only
   favours this side).

Printed: the wall time of each and the speedups of (1) over (2) (sharing alone; target
≥ 1.5×) and over (3). Token caches are warmed first, so no side pays for tokenisation.

    .venv/bin/python benchmarks/bench_trajectory.py [--preset default] [--threads 1]
        [--part live|posthoc|both] [--work DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nnobs.core.files import write_json
from nnobs.core.rundir import list_checkpoints
from nnobs.data.corpus import load_corpus
from nnobs.data.encoding import token_stream
from nnobs.data.tokenizer import get_tokenizer
from nnobs.observe.live import ObservabilityCallback
from nnobs.observe.trajectory import TrajectorySettings, observe_run, run_corpus
from nnobs.training.runconfig import load_run_config
from nnobs.training.schedule import checkpoint_steps
from nnobs.training.trainer import train

LIVE_TARGET = 0.10
SHARING_TARGET = 1.5


def live(preset: str, work: Path, overrides: list[str]) -> dict:
    mc, tc = load_run_config(preset, overrides=overrides)
    out = {"preset": preset, "overrides": overrides, "steps": tc.steps}
    out["checkpoints"] = checkpoint_steps(tc.steps, tc.first_checkpoint, tc.checkpoint_every)
    corpus = load_corpus(tc.corpus, max_chars=tc.max_chars)  # tokenizer and token caches
    tokenizer = get_tokenizer(tc.tokenizer, corpus, mc.vocab_size)  # built before timing
    for split in (corpus.train, corpus.validation):
        token_stream(split, tokenizer)
    start = time.perf_counter()
    train(mc, tc, work / "plain", progress=False, overwrite=True)
    out["plain_s"] = time.perf_counter() - start
    callback = ObservabilityCallback(work / "observed")
    start = time.perf_counter()
    train(mc, tc, work / "observed", progress=False, overwrite=True, on_checkpoint=callback)
    out["observed_s"] = time.perf_counter() - start
    doc = json.loads((work / "observed" / "trajectory" / "trajectory.json").read_text())
    out["overhead_wall"] = out["observed_s"] / out["plain_s"] - 1
    out["overhead_accounted"] = doc["budget"]["overhead"]
    out["observe_s"] = doc["budget"]["observe_seconds"]
    out["status"] = {r["step"]: r["status"] for r in doc["checkpoints"]}
    out["target"] = LIVE_TARGET
    return out


def posthoc(run: Path, work: Path, threads: int) -> dict:
    """The three ways in an order that spreads machine-load drift evenly: the shared
    trajectory before and after, the per-checkpoint ways alternating checkpoint by
    checkpoint."""
    steps = [s for s, _ in list_checkpoints(run)]
    settings = TrajectorySettings()
    observe_run(run, settings=settings, out_dir=work / "warm", steps=[steps[-1]], progress=False)
    out = {"run": str(run), "checkpoints": steps}

    def shared(name: str) -> float:
        start = time.perf_counter()
        doc = observe_run(run, settings=settings, out_dir=work / name, reuse=False, progress=False)
        out["shared_timings"] = doc["timings_s"]
        return time.perf_counter() - start

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    nnobs = Path(sys.executable).parent / "nnobs"
    first = shared("shared-1")
    subset = full = 0.0
    for s, path in list_checkpoints(run):
        start = time.perf_counter()
        observe_run(
            run,
            settings=settings,
            steps=[s],
            out_dir=work / f"one-{s}",
            reuse=False,
            progress=False,
        )
        subset += time.perf_counter() - start
        start = time.perf_counter()
        subprocess.run(
            [str(nnobs), "observe", "--model", str(path), "--out", str(work / f"full-{s}"),
             "--domain2", "none", "--no-progress"],
            check=True, env=env, capture_output=True,
        )  # fmt: skip
        full += time.perf_counter() - start
    second = shared("shared-2")
    out["shared_s"] = [first, second]
    out["independent_subset_s"] = subset
    out["independent_full_s"] = full
    mean = (first + second) / 2
    out["speedup_vs_subset"] = subset / mean
    out["speedup_vs_full"] = full / mean
    out["target"] = SHARING_TARGET
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default", help="run preset (default: default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--part", choices=("live", "posthoc", "both"), default="both")
    parser.add_argument("--work", help="working directory (default: a temporary one)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-trajectory-"))
    work.mkdir(parents=True, exist_ok=True)
    result = {"host": platform.node(), "threads": args.threads, "torch": torch.__version__}
    try:
        if args.part in ("live", "both"):
            result["live"] = live(args.preset, work, args.overrides)
            print(json.dumps({"live": result["live"]}, indent=2), flush=True)
        if args.part in ("posthoc", "both"):
            run = work / "plain"
            if not run.is_dir():
                mc, tc = load_run_config(args.preset, overrides=args.overrides)
                train(mc, tc, run, progress=False)
            run_corpus(run)  # corpus files read once before timing
            result["posthoc"] = posthoc(run, work / "posthoc", args.threads)
            print(json.dumps({"posthoc": result["posthoc"]}, indent=2), flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
