"""Bridges: training throughput against training the dense model alone, and the edit transfer's
effect on trained runs.

``throughput``: two models of a preset's shape (default ``dense``: 4 layers, d_model 128,
2048-token vocabulary; random weights, the cost does not depend on them), the bridges between
them, and one batch of random tokens. A bridge step (both models' forward passes, the two
hybrid passes over every site, the objective, backward into the bridges, AdamW) alternates with
a training step of the dense model alone on the same tokens (forward, backward, AdamW), so
drifting load slows both alike; the figure is the median over pairs of (bridge step time) /
(dense step time), with each kind's median tokens per second beside it.

``edit``: ``nnobs bridge edit`` on a trained bridge for each task, and the effect at α = 1
(the counterfactual answer's probability, edit minus random-channel control, with its interval
over items and the sign-flip p-value) collected from the ``edit.json`` results.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_bridges.py throughput --steps 10
    .venv/bin/python benchmarks/bench_bridges.py edit --bridge runs/bridge \\
        --tasks single_double_quote lambda_func --target-loss 0.65
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from nnobs.circuits.bridge_loss import bridge_objective, bridge_terms
from nnobs.circuits.bridge_model import Bridges, bridge_sites
from nnobs.models.adapter import nnobs_adapter
from nnobs.models.transformer import Transformer
from nnobs.training.runconfig import load_run_config
from nnobs.training.trainer import build_optimizer


def throughput(args: argparse.Namespace) -> dict:
    mc, tc = load_run_config(args.preset, None, [])
    dense = Transformer(mc, generator=torch.Generator().manual_seed(0))
    frozen = [nnobs_adapter(Transformer(mc, generator=torch.Generator().manual_seed(s)).eval())
              for s in (1, 2)]  # fmt: skip
    for adapter in frozen:
        adapter.model.requires_grad_(False)
    torch.manual_seed(3)
    bridges = Bridges(bridge_sites(mc.n_layers), mc.d_model, mc.d_model, mc.d_model // 4)
    bridge_opt = torch.optim.AdamW(bridges.parameters(), lr=1e-3)
    dense_opt = build_optimizer(dense.train(), tc, torch.device("cpu"))
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, mc.vocab_size, (args.batch_size, args.seq_len + 1), generator=gen)
    ids, targets = tokens[:, :-1], tokens[:, 1:]

    def bridge_step() -> float:
        start = time.perf_counter()
        loss, _ = bridge_objective(bridge_terms(bridges, *frozen, ids, targets), 1.0, 1.0, 1.0)
        bridge_opt.zero_grad(set_to_none=True)
        loss.backward()
        bridge_opt.step()
        return time.perf_counter() - start

    def dense_step() -> float:
        start = time.perf_counter()
        loss, _ = dense.training_loss(ids, targets)
        dense_opt.zero_grad(set_to_none=True)
        loss.backward()
        dense_opt.step()
        return time.perf_counter() - start

    bridge_step(), dense_step()  # warm-up
    pairs = [(bridge_step(), dense_step()) for _ in range(args.steps)]
    n_tokens = args.batch_size * args.seq_len
    bridge_s = statistics.median(b for b, _ in pairs)
    dense_s = statistics.median(d for _, d in pairs)
    return {
        "preset": args.preset,
        "threads": torch.get_num_threads(),
        "batch": [args.batch_size, args.seq_len],
        "sites": len(bridges.sites),
        "bridge_step_s": round(bridge_s, 4),
        "dense_step_s": round(dense_s, 4),
        "bridge_tokens_per_s": round(n_tokens / bridge_s),
        "dense_tokens_per_s": round(n_tokens / dense_s),
        "ratio": round(statistics.median(b / d for b, d in pairs), 2),
    }


def edit(args: argparse.Namespace) -> dict:
    from nnobs.cli import main as nnobs

    rows = {}
    for task in args.tasks:
        out = Path(args.bridge) / "edit" / task
        argv = ["bridge", "edit", "--bridge", args.bridge, "--task", task, "--out", str(out),
                "--n-items", str(args.n_items), "--target-loss", str(args.target_loss),
                "--no-progress", *(["--align", "right"] if args.align_right else [])]  # fmt: skip
        if nnobs(argv) != 0:
            rows[task] = {"refused": True}
            continue
        doc = json.loads((out / "edit.json").read_text())
        curve = {row["alpha"]: row for row in doc["curve"]}
        rows[task] = {
            "channel": f"{doc['channel']['site']}:{doc['channel']['channel']}",
            "chosen_by": doc["chosen_by"]["method"],
            "n_items": doc["test"]["n_items"],
            "p_cf_alpha0": curve[0.0]["edit"]["value"] if 0.0 in curve else None,
            "p_cf_edit_alpha1": curve[1.0]["edit"],
            "p_cf_control_alpha1": curve[1.0]["control"],
            "effect_alpha1": doc["test"]["effect"],
            "p_value": doc["test"]["p_value"],
            "verdict": doc["test"]["verdict"],
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    kinds = parser.add_subparsers(dest="kind", required=True)
    speed = kinds.add_parser("throughput", help="bridge step vs dense training step")
    speed.add_argument("--preset", default="dense")
    speed.add_argument("--steps", type=int, default=10, help="timed pairs of steps")
    speed.add_argument("--batch-size", type=int, default=8)
    speed.add_argument("--seq-len", type=int, default=128)
    effect = kinds.add_parser("edit", help="edit transfer effect at alpha = 1 per task")
    effect.add_argument("--bridge", required=True, help="a trained bridge directory")
    effect.add_argument("--tasks", nargs="+", default=["single_double_quote"])
    effect.add_argument("--n-items", type=int, default=64)
    effect.add_argument("--target-loss", type=float, default=0.15, help="the circuit's task loss")
    effect.add_argument("--align-right", action="store_true", help="line up unequal prompts")
    args = parser.parse_args()
    result = throughput(args) if args.kind == "throughput" else edit(args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
