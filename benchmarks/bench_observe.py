"""The whole observability protocol: nnobs ``observe`` against the reference's method.

Both run in the same process, one after the other, on the same model and the same token
windows (:func:`nnobs.observe.splits.token_windows`, which ``observe`` itself calls with the same
settings; the token counts are checked to agree). The reference side is
``benchmarks/reference_protocol.py``: one forward pass per layer, activations in Python lists,
an Adam-trained ``Linear(d, 1)`` probe retrained from scratch for every seed and step.

Printed: wall time per stage and in total for each, the speedup (target ≥ 20×), the layer
each reports, pcorr at that layer on the test split (mean over seeds; target: nnobs ≥
reference − 0.01), and at nnobs's reported layer the reference probe objective (mean BCE +
(l2/2)(|w|² + b²) on the probe-training tokens) reached by each side's seed-42 probe (nnobs
must reach ≤).

    .venv/bin/python benchmarks/bench_observe.py --model runs/default [--threads N] [--quick]
        [--reference-loader dataloader|slices] [--profile N] [--json OUT]
"""

from __future__ import annotations

import argparse
import cProfile
import platform
import pstats
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from nnobs.core.files import write_json
from nnobs.core.results import to_plain
from nnobs.data.corpus import load_corpus
from nnobs.data.windows import Windows, held_out_splits
from nnobs.measure.probes import LinearProbe
from nnobs.models.load import load_model
from nnobs.observe import protocol, splits
from nnobs.observe.protocol import default_domain2
from nnobs.observe.settings import ObserveSettings
from nnobs.observe.signal import residual_labels
from nnobs.observe.splits import model_trained_on, token_windows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_protocol import LOADERS, collect, reference_observe  # noqa: E402

TARGET_SPEEDUP = 20.0
PCORR_TOLERANCE = 0.01
QUICK_EX_PER_DIM = 50
BOOTSTRAP_FUNCTIONS = ("partial_spearman_ci", "bootstrap_ci")
STAGES = (
    "capture",
    "sweep",
    "multiseed",
    "test",
    "output_control",
    "controls",
    "baselines",
    "flagging",
    "labels",
    "null",
    "cross_domain",
)


def probe_objective(coef, intercept: float, X: np.ndarray, y: np.ndarray, l2: float) -> float:
    """The reference objective of a linear score with the given coefficients on ``(X, y)``."""
    probe = LinearProbe(l2=l2)
    probe.coef_, probe.intercept_ = np.asarray(coef, dtype=np.float64), float(intercept)
    return probe.objective(X, y)


def warm_up(adapter, windows) -> None:
    """Pay one-time costs before either side is timed: the first forward pass, and the first
    torch optimiser, whose construction imports ``torch._dynamo`` (seconds)."""
    with torch.inference_mode():
        adapter.forward(torch.from_numpy(windows.input_ids[:2]).to(adapter.device))
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


@contextmanager
def recording_windows() -> Iterator[list[dict[str, Windows]]]:
    """Record every set of windows :func:`nnobs.observe.splits.token_windows` builds meanwhile."""
    built: list[dict[str, Windows]] = []
    original = splits.token_windows

    def record(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    splits.token_windows = record
    try:
        yield built
    finally:
        splits.token_windows = original


def same_windows(a: Windows, b: Windows) -> bool:
    return all(
        np.array_equal(getattr(a, f), getattr(b, f))
        for f in ("input_ids", "targets", "valid", "doc_ids")
    )


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/default", help="an nnobs run directory")
    parser.add_argument("--corpus", default="stdlib")
    parser.add_argument(
        "--domain2", default="auto", help="second domain for cross-domain ('none' to skip)"
    )
    parser.add_argument("--ex-per-dim", type=int, default=None, help="token budget per width")
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_EX_PER_DIM} examples per dimension"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--reference-loader",
        choices=LOADERS,
        default="dataloader",
        help="the reference's own DataLoader loop (the faithful baseline, default), or the same "
        "sampling as slices of a permutation (the reference's method made faster)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="cProfile nnobs; print the top N"
    )
    args = parser.parse_args()

    if not Path(args.model).exists():
        raise SystemExit(
            f"no model at {args.model}: train the default model first with "
            "`nnobs train --preset default --out runs/default` (a few minutes on a CPU), "
            "or pass --model RUN_DIR"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    ex_per_dim = args.ex_per_dim or (QUICK_EX_PER_DIM if args.quick else 350)
    # The reference's label (nnobs's default too), so the pcorr comparison checks the
    # implementation, not the label choice (bench_calibration.py compares the labels).
    settings = ObserveSettings(ex_per_dim=ex_per_dim, label="reference")
    adapter = load_model(args.model, device=args.device)
    corpus = load_corpus(args.corpus)
    domain2_spec = default_domain2(args.corpus) if args.domain2 == "auto" else args.domain2
    domain2 = None if domain2_spec in (None, "none") else load_corpus(domain2_spec)

    # The reference gets the windows observe() builds for itself (same helper, same settings);
    # building them here also fills the token cache before either side is timed.
    docs, policy = held_out_splits(corpus, model_trained_on(adapter, corpus))
    windows = token_windows(adapter, docs, settings)
    windows2 = None
    if domain2 is not None:
        windows2 = token_windows(adapter, {"train": domain2.train, "test": domain2.test}, settings)
    warm_up(adapter, windows["train"])

    print(
        f"model {args.model}: {adapter.n_layers} layers, d_model {adapter.d_model}; "
        f"{ex_per_dim} ex/dim; reference loader {args.reference_loader}; "
        f"corpus {corpus.name} ({policy}); domain 2 "
        f"{domain2.name if domain2 else 'none'}; device {args.device}, "
        f"{torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()}",
        flush=True,
    )
    print("running nnobs observe ...", flush=True)
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    with recording_windows() as observed_windows:
        ours, ours_s = timed(
            protocol.observe, adapter, corpus, settings=settings, domain2=domain2, progress=False
        )
    if profiler:
        profiler.disable()
        profile = pstats.Stats(profiler).sort_stats("cumulative")
        profile.print_stats(args.profile)
        stats_rows = profile.stats.items()  # (file, line, function) -> (.., .., .., cumulative, ..)
        bootstrap_s = sum(row[3] for key, row in stats_rows if key[2] in BOOTSTRAP_FUNCTIONS)
        print(f"  of which bootstrap confidence intervals: {bootstrap_s:.1f} s", flush=True)
    ours = to_plain(ours)
    print(f"  {ours_s:.1f} s", flush=True)
    print("running the reference protocol ...", flush=True)
    ref, ref_s = timed(
        reference_observe,
        adapter,
        windows,
        settings,
        domain2_windows=windows2,
        loader=args.reference_loader,
        log=lambda msg: print(f"  {msg}", flush=True),
    )
    print(f"  {ref_s:.1f} s", flush=True)

    # Same tokens: the windows observe() built are the ones the reference was given.
    expected = [windows] + ([windows2] if windows2 is not None else [])
    given = [observed_windows[0]] + ([observed_windows[-1]] if windows2 is not None else [])
    for theirs, mine in zip(given, expected, strict=True):
        if set(theirs) != set(mine) or not all(same_windows(theirs[s], mine[s]) for s in mine):
            raise SystemExit("observe() read other token windows than the reference was given")
    counts = {s: w.n_tokens for s, w in windows.items()}
    if windows2 is not None:
        counts.update({f"domain2 {s}": w.n_tokens for s, w in windows2.items()})

    # Probe objective at nnobs's reported layer, both seed-42 probes on the same float32 rows.
    layer = ours["layer"]
    site = ours["headline"]["site"]
    train = collect(adapter, windows["train"], [site], settings.batch_size, "train")
    X, y = train.acts(site), residual_labels(train, site, "reference")
    l2 = LinearProbe().l2
    ours_obj = probe_objective(ours["probe"]["coef"], ours["probe"]["intercept"], X, y, l2)
    ref_probe = ref["sweep_probes"][layer]
    ref_obj = probe_objective(ref_probe["coef"], ref_probe["intercept"], X, y, l2)

    ours_t, ref_t = ours["timings_s"], ref["timings_s"]
    speedup = ref_s / ours_s
    pcorr_ours, pcorr_ref = ours["headline"]["mean"], ref["headline"]["mean"]
    checks = {
        "speedup": speedup >= TARGET_SPEEDUP,
        "pcorr": pcorr_ours >= pcorr_ref - PCORR_TOLERANCE,
        "objective": ours_obj <= ref_obj,
    }

    print()
    print(f"identical token windows; tokens: {', '.join(f'{s} {n}' for s, n in counts.items())}")
    passes = 3 + (2 if domain2 is not None else 0) + 2 * settings.null_models
    print(f"forward passes over a split: nnobs {passes}, reference {ref['forward_passes']}")
    print()
    print(f"{'stage':<22} {'nnobs s':>9} {'reference s':>12} {'ratio':>8}")
    print("-" * 54)
    for stage in STAGES:
        a, b = ours_t.get(stage), ref_t.get(stage)
        ratio = f"{b / a:7.1f}x" if a and b else "       -"
        print(f"{stage:<22} {_s(a):>9} {_s(b):>12} {ratio}")
    other_ours = ours_s - sum(ours_t.values())
    other_ref = ref_s - sum(ref_t.values())
    print(f"{'other':<22} {_s(other_ours):>9} {_s(other_ref):>12}")
    print("-" * 54)
    print(f"{'total wall time':<22} {ours_s:>9.1f} {ref_s:>12.1f} {speedup:7.1f}x")
    print()
    print(f"{'':<40} {'nnobs':>9} {'reference':>10}")
    print(f"{'sweep pcorr per layer (validation)':<40}")
    for a, b in zip(ours["sweep"], ref["sweep"], strict=True):
        print(f"{'  layer ' + str(a['layer']):<40} {a['pcorr']:>+9.4f} {b['pcorr']:>+10.4f}")
    print(f"{'multi-seed mean per candidate (validation)':<40}")
    ref_means = {r["layer"]: r["mean"] for r in ref["multiseed"]}
    for r in ours["multiseed"]:
        theirs = ref_means.get(r["layer"])
        print(f"{'  layer ' + str(r['layer']):<40} {r['mean']:>+9.4f} {_signed(theirs):>10}")
    print(f"{'candidates':<40} {str(ours['candidates']):>9} {str(ref['candidates']):>10}")
    print(f"{'reported layer':<40} {ours['layer']:>9} {ref['layer']:>10}")
    print(
        f"{'pcorr at reported layer (test, mean)':<40} {pcorr_ours:>+9.4f} {pcorr_ref:>+10.4f}"
        f"   diff {pcorr_ours - pcorr_ref:+.4f}"
    )
    print(
        f"{'  std over seeds':<40} {ours['headline']['std']:>9.4f} {ref['headline']['std']:>10.4f}"
    )
    print(
        f"{'output-controlled pcorr (test, mean)':<40} "
        f"{ours['output_controlled']['mean']:>+9.4f} {ref['output_controlled']['mean']:>+10.4f}"
    )
    print(f"{f'probe objective at layer {layer} (seed 42)':<40} {ours_obj:>9.6f} {ref_obj:>10.6f}")
    null = ours["null"]
    print(f"{'random-init null -> floor (nnobs only)':<40} {null['floor']:>9.4f}")
    print(f"{'verdict p-value (nnobs only)':<40} {null['p_value']:>9.4f}")
    print()
    print(
        f"speedup {speedup:.1f}x (target >= {TARGET_SPEEDUP:.0f}x): "
        f"{'met' if checks['speedup'] else 'MISSED'}; "
        f"pcorr diff {pcorr_ours - pcorr_ref:+.4f} (target >= -{PCORR_TOLERANCE}): "
        f"{'met' if checks['pcorr'] else 'MISSED'}; "
        f"objective nnobs <= reference: {'met' if checks['objective'] else 'MISSED'}"
    )

    if args.json is not None:
        write_json(
            args.json,
            to_plain(
                {
                    "model": args.model,
                    "ex_per_dim": ex_per_dim,
                    "torch_threads": torch.get_num_threads(),
                    "reference_loader": args.reference_loader,
                    "tokens": counts,
                    "wall_s": {"nnobs": ours_s, "reference": ref_s},
                    "speedup": speedup,
                    "timings_s": {"nnobs": ours_t, "reference": ref_t},
                    "layer": {"nnobs": ours["layer"], "reference": ref["layer"]},
                    "pcorr_test_mean": {"nnobs": pcorr_ours, "reference": pcorr_ref},
                    "objective": {"layer": layer, "nnobs": ours_obj, "reference": ref_obj},
                    "checks": checks,
                }
            ),
        )
    if args.strict and not all(checks.values()):
        raise SystemExit(1)


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4f}"


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}"


if __name__ == "__main__":
    main()
