"""Batched activation patching against one forward pass per patch.

A full layers × positions sweep (``resid_pre`` of every layer at every position) over a
built-in task, its items of one token length, on the default model (the
``default`` preset: 4 layers, 128 wide, the 4096-token stdlib BPE; random weights unless
``--model`` names a trained run: the cost does not depend on the weights). Three ways to
the same numbers:

- batched: ``patch_sweep_arrays`` with ``--batch-size`` rows per forward pass, each row a
  different (item, layer, position) patch;
- per patch: the same code with one row per forward pass, i.e. one forward pass per patch;
- reference: ``patched_run``, the plain implementation (source run + patched run per call),
  on the first ``--reference-items`` items.

It checks that all agree to 1e-5 and prints wall times and the speedup.

    .venv/bin/python benchmarks/bench_patching.py [--model runs/default] [--task bracket]
        [--items 64] [--batch-size 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from nnobs.data.tasks import load_task
from nnobs.interventions.patching import (
    PatchSettings,
    patch_sweep_arrays,
    patched_run,
    sweep_units,
)
from nnobs.models.adapter import nnobs_adapter
from nnobs.models.load import load_model
from nnobs.models.transformer import Transformer


def default_model(device: str):
    from nnobs.data.corpus import load_corpus
    from nnobs.data.tokenizer import get_tokenizer
    from nnobs.training.runconfig import load_run_config

    model_config, train_config = load_run_config("default", None, [])
    tokenizer = get_tokenizer(
        train_config.tokenizer, load_corpus(train_config.corpus), model_config.vocab_size
    )
    torch.manual_seed(0)
    model = Transformer(model_config).to(device).eval()
    return nnobs_adapter(model, tokenizer, {"path": "default preset, random init"})


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a trained run (default: the default preset, random)")
    parser.add_argument("--task", default="bracket")
    parser.add_argument("--items", type=int, default=64, help="generated before filtering")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--reference-items", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    adapter = (
        load_model(args.model, device=args.device) if args.model else default_model(args.device)
    )
    task = load_task(args.task, adapter.tokenizer, n=args.items)
    # Keep the items of one length (the one with the most patches), so the sweep covers
    # every position of every prompt.
    task = task.subset(max(task.groups(), key=lambda g: len(g) * len(task.corrupted[g[0]])))
    units = sweep_units(adapter, "resid_pre")
    lengths = sorted({len(c) for c in task.corrupted})
    batched_settings = PatchSettings(batch_size=args.batch_size)
    patch_sweep_arrays(adapter, task, units[:1], batched_settings)  # warm up

    batched, t_batched = timed(lambda: patch_sweep_arrays(adapter, task, units, batched_settings))
    single, t_single = timed(
        lambda: patch_sweep_arrays(adapter, task, units, PatchSettings(batch_size=1))
    )
    n_patches = int(np.isfinite(batched.patched).sum())

    def reference():
        out = np.full((args.reference_items, len(units), len(batched.positions)), np.nan)
        for i in range(args.reference_items):
            length = len(task.corrupted[i])
            for u, unit in enumerate(units):
                for j, offset in enumerate(batched.positions):
                    pos = length + offset if offset < 0 else offset
                    logits = patched_run(adapter, task, i, [(unit, pos)])
                    out[i, u, j] = float(
                        logits[-1, task.correct[i]] - logits[-1, task.incorrect[i]]
                    )
        return out

    ref, t_ref = timed(reference)
    n_ref = ref.size
    diff_single = float(np.nanmax(np.abs(batched.patched - single.patched)))
    diff_ref = float(np.nanmax(np.abs(batched.patched[: args.reference_items] - ref)))
    result = {
        "device": str(adapter.device),
        "torch_threads": torch.get_num_threads(),
        "model": adapter.provenance.get("path"),
        "config": {
            k: adapter.provenance["config"][k] for k in ("n_layers", "d_model", "vocab_size")
        },
        "task": task.name,
        "items": len(task),
        "prompt_tokens": lengths,
        "sweep": f"resid_pre: {len(units)} layers x {len(batched.positions)} positions",
        "patches": n_patches,
        "batch_size": args.batch_size,
        "batched_s": round(t_batched, 3),
        "per_patch_s": round(t_single, 3),
        "speedup": round(t_single / t_batched, 2),
        "reference_s_per_patch": round(t_ref / n_ref, 5),
        "reference_speedup": round((t_ref / n_ref) * n_patches / t_batched, 2),
        "max_abs_diff_per_patch": diff_single,
        "max_abs_diff_reference": diff_ref,
    }
    print(json.dumps(result, indent=2))
    assert diff_single <= 1e-5 and diff_ref <= 1e-5, "batched results differ"


if __name__ == "__main__":
    main()
