"""Calibration of the observe verdict on simulated captures where the truth is known.

Each trial builds a "trained model" capture (probe-train and test splits) and ``--null-models``
"random-init model" captures from a generator, then runs the protocol's own code on them:
the label (``rank`` or ``reference``), the seed probes on bootstrap resamples of the training
documents, the seed ensemble on the test split with its interval over test documents and
probe training (:func:`nnobs.observe.stages.evaluate_on_test`), and the test against the null
(:func:`nnobs.observe.null.headline_against_null`). The verdict "above the floor" is counted.

The generator follows how next-token loss depends on confidence in a calibrated model: a
token's top prediction (probability ``c`` = max softmax) is correct with probability ``c``
(loss ``-log c``), otherwise the target has a probability below ``1 - c`` (loss
``-log(u (1 - c))``, u uniform); loss is therefore strongly convex in ``c``. Documents have
their own confidence level (tokens of one document are not independent). Activations carry
confidence nonlinearly (``logit c``, ``c``, ``c²``, ``log(1 - c)`` through a random mixing
matrix, different for every model, plus noise): a probe can read confidence but, under the
null, nothing beyond it. A planted model carries private evidence along a hidden direction,
of one of two kinds (``--signals``): *correctness*, ``strength × (correct - c)`` (whether the
top prediction is right), with the loss untouched; or *difficulty*, a per-token ``z`` that
scales the loss (``loss × exp(0.3 z)``) and that the activations carry as ``strength × z``
(how bad the loss is beyond what confidence and correctness say). With ``--model
RUN`` the (max softmax, loss) pairs are resampled from a real capture of that model instead.

    .venv/bin/python benchmarks/bench_calibration.py                 # 200 nulls, 3 strengths
    .venv/bin/python benchmarks/bench_calibration.py --nulls 400 --strengths 0.1 0.2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from nnobs.observe.capture import Capture
from nnobs.observe.null import headline_against_null
from nnobs.observe.settings import ObserveSettings
from nnobs.observe.signal import fit_seed_probes
from nnobs.observe.splits import SplitData
from nnobs.observe.stages import evaluate_on_test

SITE = "blocks.0.resid_post"


def confidence_and_loss(rng: np.random.Generator, n_docs: int, doc_len: int, pairs=None):
    """(max softmax, loss, correct, doc ids) for ``n_docs`` documents of ``doc_len`` tokens."""
    n = n_docs * doc_len
    doc_ids = np.repeat(np.arange(n_docs), doc_len)
    if pairs is not None:  # resample whole real (c, loss) pairs; correctness is not observed
        idx = rng.integers(0, len(pairs), n)
        c, loss = pairs[idx, 0], pairs[idx, 1]
        return c, loss, (loss < -np.log(np.maximum(c, 1e-6)) + 1e-4).astype(float), doc_ids
    level = rng.beta(2.0, 2.0, n_docs)[doc_ids]  # a document's typical confidence
    c = np.clip(rng.beta(1 + 6 * level, 1 + 6 * (1 - level)), 0.02, 0.995)
    correct = rng.random(n) < c
    wrong = -np.log(rng.uniform(0.01, 1.0, n) * (1 - c))
    return c, np.where(correct, -np.log(c), wrong), correct.astype(float), doc_ids


def simulated_split(rng, mixing, hidden, strength, signal, n_docs, doc_len, pairs, d) -> SplitData:
    c, loss, correct, doc_ids = confidence_and_loss(rng, n_docs, doc_len, pairs)
    z = rng.standard_normal(len(c))
    if signal == "difficulty":
        loss = loss * np.exp(0.3 * z)
    logit = np.log(c / (1 - c))
    features = np.column_stack([logit, c, c**2, np.log(1 - c)])
    features = (features - features.mean(0)) / features.std(0)
    X = features @ mixing + rng.standard_normal((len(c), d))
    if signal == "difficulty":
        X += strength * np.outer(z, hidden)
    else:
        X += strength * np.outer(correct - c, hidden) / 0.3  # (correct - c) has sd about 0.3
    cap = Capture(
        loss=loss.astype(np.float32),
        max_softmax=c.astype(np.float32),
        entropy=np.zeros(len(c), np.float32),
        doc_ids=doc_ids,
        acts={SITE: X.astype(np.float16)},
        norms={SITE: np.linalg.norm(X, axis=1).astype(np.float32)},
        stats={},
    )
    return SplitData("sim", cap)


def headline(rng, strength, signal, settings, args, pairs) -> dict:
    """The protocol's headline record on one simulated model (a fresh mixing matrix)."""
    mixing = rng.standard_normal((4, args.d))
    hidden = np.linalg.qr(rng.standard_normal((args.d, 1)))[0][:, 0]
    splits = [
        simulated_split(
            rng, mixing, hidden, strength, signal, args.docs, args.doc_len, pairs, args.d
        )
        for _ in range(2)
    ]
    train, test = splits
    probes = fit_seed_probes(train, SITE, settings.seeds, "cpu", settings.label)
    record, _, _ = evaluate_on_test(probes, test, 0, SITE, settings)
    return record


def trial(seed: int, strength: float, signal: str, label: str, args, pairs) -> tuple[bool, float]:
    rng = np.random.default_rng(seed)
    settings = ObserveSettings(label=label, n_boot=args.n_boot, null_models=args.null_models)
    observed = headline(rng, strength, signal, settings, args, pairs)
    nulls = [headline(rng, 0.0, signal, settings, args, pairs) for _ in range(args.null_models)]
    test = headline_against_null(observed, nulls, settings.level)
    return test["significant"], observed["ensemble"]


def real_pairs(run: str) -> np.ndarray:
    """(max softmax, loss) of every validation token the protocol would capture on ``run``."""
    from nnobs.data.windows import held_out_splits
    from nnobs.models.load import load_model
    from nnobs.observe.splits import capture_splits, model_trained_on
    from nnobs.observe.trajectory import run_corpus

    adapter = load_model(run)
    corpus = run_corpus(Path(run))
    docs, _ = held_out_splits(corpus, model_trained_on(adapter, corpus))
    site = adapter.site_name(0)
    data = capture_splits(
        adapter, {"validation": docs["validation"]}, [site], ObserveSettings(), None, True
    )
    cap = data["validation"].cap
    return np.column_stack([cap.max_softmax, cap.loss]).astype(np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nulls", type=int, default=200, help="null trials per label (200)")
    parser.add_argument("--planted", type=int, default=40, help="trials per strength (40)")
    parser.add_argument("--signals", nargs="+", default=["correctness", "difficulty"])
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--labels", nargs="+", default=["rank", "reference"])
    parser.add_argument("--null-models", type=int, default=ObserveSettings().null_models)
    parser.add_argument("--docs", type=int, default=40, help="documents per split (40)")
    parser.add_argument("--doc-len", type=int, default=128, help="tokens per document (128)")
    parser.add_argument("--d", type=int, default=32, help="activation width (32)")
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--model", help="resample (max softmax, loss) from this run's capture")
    args = parser.parse_args()
    pairs = real_pairs(args.model) if args.model else None
    rows = []
    cases = [("none", 0.0, args.nulls)]
    cases += [(sig, s, args.planted) for sig in args.signals for s in args.strengths]
    for label in args.labels:
        for signal, strength, n in cases:
            start = time.perf_counter()
            outcomes = [
                trial(10_000 * i + 7, strength, signal, label, args, pairs) for i in range(n)
            ]
            hits = sum(o[0] for o in outcomes)
            ci = binomtest(hits, n).proportion_ci(0.95)
            rows.append(
                {
                    "label": label,
                    "signal": signal,
                    "strength": strength,
                    "trials": n,
                    "above_floor": hits / n,
                    "ci95": [round(ci.low, 3), round(ci.high, 3)],
                    "mean_headline": float(np.mean([o[1] for o in outcomes])),
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print("\n| label | planted | trials | 'above the floor' | 95% CI | mean headline |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        kind = (
            "none (false-positive rate)"
            if r["strength"] == 0
            else f"{r['signal']} {r['strength']:g} (power)"
        )
        print(
            f"| {r['label']} | {kind} | {r['trials']} | {r['above_floor']:.1%} | "
            f"[{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}] | {r['mean_headline']:+.3f} |"
        )


if __name__ == "__main__":
    main()
