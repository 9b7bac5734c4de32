"""Where nnobs's pcorr and the reference method's part ways, one difference at a time.

On a Hugging Face model that nnobs did not train (``outside_gpt2.py`` trains one with plain
``transformers``), the layer profile — a probe per layer trained on the train split, pcorr on
the test split — is measured with nnobs's choices and with the reference's, and with each
choice switched alone, both ways:

- **sampling**: nnobs's random spans spread over every document (``spread``), or the
  reference's openings of the shortest documents (``reference``,
  :func:`nnobs.data.windows.opening_windows`);
- **solver**: nnobs's probe solved to the optimum of the reference's objective
  (:class:`nnobs.measure.probes.LinearProbe`, all rows, deterministic), or the reference's
  20 epochs of Adam (:class:`reference_probe.ReferenceAdamProbe`, mean pcorr of seeds 42-44);
- **window length**: nnobs's default 256 tokens, or the reference's whole opening (512);
- **label**: the sign of the rank residual that pcorr correlates (``rank``), or of the
  reference's OLS residual on raw values (``reference``).

Every configuration reads the same model and corpus splits at the same token budget; a
configuration with reference sampling is scored on other tokens (the openings of short
files), which is part of what that choice changes. Printed: pcorr per layer, the mean over
layers, and at the headline layer (nnobs's best) a 95% interval over test documents.

    .venv/bin/python benchmarks/outside_gpt2.py --out runs/outside-gpt2 --steps 400
    .venv/bin/python benchmarks/bench_reference_gap.py --model runs/outside-gpt2 [--json OUT]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nnobs.core.files import write_json
from nnobs.data.corpus import load_corpus
from nnobs.data.windows import held_out_splits
from nnobs.measure import stats
from nnobs.measure.probes import LinearProbe
from nnobs.models.load import load_model
from nnobs.observe.settings import ObserveSettings
from nnobs.observe.signal import residual_labels
from nnobs.observe.splits import (
    SplitData,
    capture_splits,
    layer_sites,
    model_trained_on,
    token_windows,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_probe import ReferenceAdamProbe  # noqa: E402

ADAM_SEEDS = (42, 43, 44)
FACTORS = ("sampling", "solver", "window", "label")


@dataclass(frozen=True)
class Method:
    sampling: str  # "spread" | "reference"
    solver: str  # "exact" | "adam"
    window: int
    label: str  # "rank" | "reference"

    def switched(self, factor: str, other: Method) -> Method:
        return Method(**{**self.__dict__, factor: getattr(other, factor)})


NNOBS = Method("spread", "exact", 256, "rank")
REFERENCE = Method("reference", "adam", 512, "reference")


def configurations() -> list[tuple[str, Method]]:
    """nnobs's method, each factor switched alone toward the reference, the reference's method,
    each factor switched alone back toward nnobs's, and nnobs's method with the reference's
    label (the comparison published numbers allow) with each other factor switched alone."""
    rows = [("nnobs", NNOBS)]
    rows += [(f"nnobs, {f} as reference", NNOBS.switched(f, REFERENCE)) for f in FACTORS]
    rows += [("reference", REFERENCE)]
    rows += [(f"reference, {f} as nnobs", REFERENCE.switched(f, NNOBS)) for f in FACTORS]
    labelled = NNOBS.switched("label", REFERENCE)
    rows += [
        (f"nnobs with reference label, {f} as reference", labelled.switched(f, REFERENCE))
        for f in FACTORS
        if f != "label"
    ]
    return rows


def scores(method: Method, train: SplitData, test: SplitData, site: str) -> np.ndarray:
    """Test scores of the method's probe (columns: one per Adam seed, or the one exact fit)."""
    labels = residual_labels(train, site, method.label)
    X = train.acts(site)
    if method.solver == "exact":
        probes = [LinearProbe(resample=False).fit(X, labels)]
    else:
        probes = [ReferenceAdamProbe(seed=seed).fit(X, labels) for seed in ADAM_SEEDS]
    return np.column_stack([p.decision_function(test.acts(site)) for p in probes])


def profile(method: Method, data: dict[str, SplitData], sites: dict[int, str], n_boot: int):
    """pcorr on test at each layer (mean over the score columns) and its 95% interval over
    test documents (every column's replicates on the same document resamples, averaged)."""
    out = {}
    test = data["test"]
    for layer, site in sites.items():
        score = scores(method, data["train"], test, site)
        cov = test.covariates(site)
        values = [stats.partial_spearman(s, test.cap.loss, cov) for s in score.T]
        replicates = np.mean(
            [
                stats.partial_spearman_replicates(
                    s, test.cap.loss, cov, n_boot=n_boot, groups=test.cap.doc_ids
                )
                for s in score.T
            ],
            axis=0,
        )
        low, high = np.nanpercentile(replicates, [2.5, 97.5])
        out[layer] = {"pcorr": float(np.mean(values)), "ci": [float(low), float(high)]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/outside-gpt2", help="a Hugging Face directory")
    parser.add_argument("--corpus", default="stdlib")
    parser.add_argument(
        "--ex-per-dim",
        type=int,
        default=150,
        help="token budget per width (150: the openings of the stdlib test split's 70 files "
        "cannot fill the protocol's 350)",
    )
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    adapter = load_model(args.model)
    corpus = load_corpus(args.corpus)
    docs, policy = held_out_splits(corpus, model_trained_on(adapter, corpus))
    docs = {"train": docs["train"], "test": docs["test"]}
    captures: dict[tuple[str, int], dict[str, SplitData]] = {}
    results = []
    for name, method in configurations():
        key = (method.sampling, method.window)
        settings = ObserveSettings(
            ex_per_dim=args.ex_per_dim, seq_len=method.window, sampling=method.sampling
        )
        sites = layer_sites(adapter, settings)
        if key not in captures:
            windows = token_windows(adapter, docs, settings)
            captures[key] = capture_splits(
                adapter, docs, list(sites.values()), settings, None, False, windows=windows
            )
        layers = profile(method, captures[key], sites, args.n_boot)
        results.append({"configuration": name, "method": method.__dict__, "layers": layers})
        print(f"{name}: " + " ".join(f"{v['pcorr']:+.3f}" for v in layers.values()), flush=True)

    spread_test = captures[(NNOBS.sampling, NNOBS.window)]["test"].cap.loss
    opening_test = captures[(REFERENCE.sampling, REFERENCE.window)]["test"].cap.loss
    print(
        f"model's mean test loss: {spread_test.mean():.3f} nats on spread windows, "
        f"{opening_test.mean():.3f} on the openings of the shortest documents"
    )
    headline = max(results[0]["layers"], key=lambda layer: results[0]["layers"][layer]["pcorr"])
    print_table(results, headline)
    report = {
        "model": args.model,
        "corpus": corpus.name,
        "splits": policy,
        "tokens_per_split": ObserveSettings(ex_per_dim=args.ex_per_dim).token_budget(
            adapter.d_model
        ),
        "headline_layer": headline,
        "test_loss": {"spread": float(spread_test.mean()), "openings": float(opening_test.mean())},
        "results": results,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if args.json is not None:
        write_json(args.json, report)


def print_table(results: list[dict], headline: int) -> None:
    layers = list(results[0]["layers"])
    head = " | ".join(f"L{layer}" for layer in layers)
    print(f"\n| configuration | {head} | mean | L{headline} 95% CI (test documents) |")
    print("|---|" + "---|" * (len(layers) + 2))
    for row in results:
        values = [row["layers"][layer]["pcorr"] for layer in layers]
        low, high = row["layers"][headline]["ci"]
        cells = " | ".join(f"{v:+.3f}" for v in values)
        print(
            f"| {row['configuration']} | {cells} | {np.mean(values):+.3f} | "
            f"[{low:+.3f}, {high:+.3f}] |"
        )


if __name__ == "__main__":
    main()
