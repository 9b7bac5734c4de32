"""The frontier's statistics: each model's geometric-mean circuit size and pretraining loss
with intervals, and the paper's two claims as tests with verdicts.

**Measures.** Per grid point and training seed: ``log(edges + 1)`` of each task (NaN where
the model does not reach the target loss; a circuit can have no edges, and
:func:`nnobs.circuits.sizes.geomean_edges` counts the same way) and the summed next-token loss
of each evaluation document, with its token count (every model is scored on the same
documents). A point's circuit size is the geometric mean of ``edges + 1`` over seeds and the
*common* tasks (those every model reaches at every seed), minus 1, so every point is averaged
over the same tasks. A comparison of two points uses the tasks *both* reach: the ratio of
their geometric means of ``edges + 1`` over those tasks (a pair often shares more tasks than
the whole grid does). A point's loss is the token-weighted mean over documents, averaged over
seeds.

**Intervals.** A bootstrap draws tasks (shared by the points it compares: the comparison is
paired), documents (shared likewise) and, per point, training seeds, all with replacement. A
difference between two points has the bootstrap's standard error, widened by √(n/(n−1)) (the
bootstrap's own small-sample bias), and a Student t reference with n − 1 degrees of freedom,
n the number of units resampled (the comparison's tasks for circuit size, documents for loss):
with a handful of tasks a percentile interval would be too narrow, and the tests on simulated grids
(``tests/test_frontier_stats.py``) hold the level with this one (with one training seed it is
the paired t-test over tasks; with several, the seeds' variance is counted both through the
tasks and through the seeds, so the test is conservative).

**Claims** (Gao et al. 2025), each a set of one-sided comparisons:

- ``sparser``: at a fixed width, the sparser model of each adjacent pair in L0 has smaller
  circuits (Δ log edges < 0) and higher loss (Δ loss > 0);
- ``wider``: at a fixed L0, the wider model (more total parameters) of each adjacent pair in
  width has smaller circuits and lower loss (the frontier moves down and to the left).

A claim is *supported* when every comparison is significant in the claimed direction at
``level`` (an intersection–union test: level ``level`` without correction), *contradicted*
when any comparison is significant in the opposite direction at ``level`` / (number of
comparisons) (Bonferroni), and *inconclusive* otherwise. The same rule gives a verdict for each
half of a claim (circuit size alone, loss alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from nnobs.core.errors import NnobsError

VERDICTS = ("supported", "contradicted", "inconclusive")
# claim: (what it says, direction of Δ log edges, direction of Δ loss) for each pair (a → b)
CLAIMS = {
    "sparser": ("at a fixed width, a sparser model has smaller circuits but higher loss", -1, +1),
    "wider": (
        "at a fixed L0, more total parameters give smaller circuits and lower loss "
        "(the frontier moves down and to the left)",
        -1,
        -1,
    ),
}


@dataclass
class FrontierMeasures:
    """``log_edges`` (points, seeds, tasks), NaN where a model did not reach a task;
    ``loss_sums`` (points, seeds, documents), each document's summed token loss;
    ``doc_tokens`` (documents,), its scored tokens. :meth:`estimates` and :meth:`replicates`
    need every edge count finite: :meth:`select` the tasks first."""

    log_edges: np.ndarray
    loss_sums: np.ndarray
    doc_tokens: np.ndarray

    def __post_init__(self) -> None:
        self.log_edges = np.asarray(self.log_edges, dtype=np.float64)
        self.loss_sums = np.asarray(self.loss_sums, dtype=np.float64)
        self.doc_tokens = np.asarray(self.doc_tokens, dtype=np.float64)
        p, s, _ = self.log_edges.shape
        if self.loss_sums.shape[:2] != (p, s) or self.loss_sums.shape[2:] != self.doc_tokens.shape:
            raise NnobsError(
                f"frontier measures disagree in shape: edges {self.log_edges.shape}, losses "
                f"{self.loss_sums.shape}, document tokens {self.doc_tokens.shape}"
            )

    def reached(self) -> np.ndarray:
        """(points, tasks): whether each model reaches each task at every seed."""
        return np.isfinite(self.log_edges).all(axis=1)

    def select(self, points: list[int], tasks: np.ndarray) -> FrontierMeasures:
        """The measures of some points over some tasks (a boolean mask)."""
        idx = np.asarray(points, dtype=int)
        return FrontierMeasures(self.log_edges[idx][:, :, tasks], self.loss_sums[idx],
                                self.doc_tokens)  # fmt: skip

    @property
    def n_tasks(self) -> int:
        return self.log_edges.shape[2]

    @property
    def n_docs(self) -> int:
        return len(self.doc_tokens)

    def estimates(self) -> tuple[np.ndarray, np.ndarray]:
        """Per point: mean log edges over seeds and tasks, and mean loss (nats per token)."""
        loss = self.loss_sums.sum(2) / self.doc_tokens.sum()
        if self.n_tasks == 0:  # no task to average over: no circuit size to compare
            return np.full(len(loss), np.nan), loss.mean(1)
        return self.log_edges.mean(axis=(1, 2)), loss.mean(1)

    def replicates(self, n_boot: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Bootstrap replicates of :meth:`estimates`, (n_boot, points) each."""
        rng = np.random.default_rng(seed)
        p, s, t = self.log_edges.shape
        task_w = (
            rng.multinomial(t, np.full(t, 1 / t), size=n_boot) / t if t else np.zeros((n_boot, 0))
        )
        doc_w = rng.multinomial(self.n_docs, np.full(self.n_docs, 1 / self.n_docs), size=n_boot)
        seed_w = rng.multinomial(s, np.full(s, 1 / s), size=(n_boot, p)) / s  # (B, P, S)
        edges = np.einsum("bt,pst->bps", task_w, self.log_edges)
        sums = np.einsum("bd,psd->bps", doc_w, self.loss_sums)
        loss = sums / (doc_w @ self.doc_tokens)[:, None, None]
        return (seed_w * edges).sum(2), (seed_w * loss).sum(2)


def difference_test(difference: float, replicates: np.ndarray, n_units: int, level: float) -> dict:
    """A difference's interval at 1 − ``level`` (two-sided) and one-sided p-values, from its
    bootstrap replicates over ``n_units`` resampled units (see the module doc)."""
    if n_units < 2 or not np.isfinite(difference):
        return {"ci": None, "p_below": 1.0, "p_above": 1.0}
    se = float(np.std(replicates, ddof=1)) * np.sqrt(n_units / (n_units - 1))
    df = n_units - 1
    if se == 0:
        below = 0.0 if difference < 0 else 1.0
        above = 0.0 if difference > 0 else 1.0
        return {"ci": [difference, difference], "p_below": below, "p_above": above}
    half = float(stats.t.ppf(1 - level / 2, df)) * se
    z = difference / se
    return {
        "ci": [difference - half, difference + half],
        "p_below": float(stats.t.cdf(z, df)),
        "p_above": float(stats.t.sf(z, df)),
    }


def claim_pairs(points: list[dict[str, Any]]) -> dict[str, list[tuple[int, int]]]:
    """Index pairs (a, b) each claim compares, b the sparser (``sparser``) or the wider
    (``wider``) model; ``points`` have ``width`` and ``nonzero`` (None: dense)."""
    order = lambda p: np.inf if p["nonzero"] is None else p["nonzero"]  # noqa: E731
    sparser, wider = [], []
    for width in sorted({p["width"] for p in points}):
        here = sorted((i for i, p in enumerate(points) if p["width"] == width),
                      key=lambda i: -order(points[i]))  # fmt: skip
        sparser += list(zip(here, here[1:], strict=False))
    for nonzero in sorted({p["nonzero"] for p in points if p["nonzero"] is not None}):
        here = sorted((i for i, p in enumerate(points) if p["nonzero"] == nonzero),
                      key=lambda i: points[i]["width"])  # fmt: skip
        wider += list(zip(here, here[1:], strict=False))
    return {"sparser": sparser, "wider": wider}


def _verdict(tests: list[tuple[dict, int]], level: float) -> str:
    """Supported / contradicted / inconclusive over (test, claimed sign) pairs (module doc)."""
    if not tests:
        return "inconclusive"
    claimed = [t["p_below"] if sign < 0 else t["p_above"] for t, sign in tests]
    opposite = [t["p_above"] if sign < 0 else t["p_below"] for t, sign in tests]
    if all(p < level for p in claimed):
        return "supported"
    if any(p < level / len(tests) for p in opposite):
        return "contradicted"
    return "inconclusive"


def claim_verdicts(
    measures: FrontierMeasures,
    points: list[dict[str, Any]],
    *,
    tasks: list[str] | None = None,
    n_boot: int = 2000,
    level: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """Each point's estimates with intervals (circuit size over the common tasks, named in
    ``common``), and each claim's comparisons (circuit size over the tasks both models reach,
    named from ``tasks``) and verdicts."""
    names = tasks if tasks is not None else [f"task {i}" for i in range(measures.n_tasks)]
    reached = measures.reached()
    common = reached.all(axis=0)
    everyone = measures.select(list(range(len(points))), common)
    log_edges, loss = everyone.estimates()
    rep_edges, rep_loss = everyone.replicates(n_boot, seed)
    units = {"edges": everyone.n_tasks, "loss": measures.n_docs}
    per_point = []
    for i in range(len(points)):
        edges_t = difference_test(log_edges[i], rep_edges[:, i], units["edges"], level)
        loss_t = difference_test(loss[i], rep_loss[:, i], units["loss"], level)
        per_point.append({
            "geomean_edges": _finite(np.expm1(log_edges[i])),
            "geomean_edges_ci": None if edges_t["ci"] is None else np.expm1(edges_t["ci"]).tolist(),
            "loss": float(loss[i]),
            "loss_ci": loss_t["ci"],
        })  # fmt: skip
    claims = {}
    for name, pairs in claim_pairs(points).items():
        statement, edge_sign, loss_sign = CLAIMS[name]
        comparisons, edge_tests, loss_tests = [], [], []
        for a, b in pairs:
            shared = reached[a] & reached[b]
            both = measures.select([a, b], shared)
            pair_edges, _ = both.estimates()
            pair_reps, _ = both.replicates(n_boot, seed)
            edges_delta = pair_edges[1] - pair_edges[0]
            e = difference_test(edges_delta, pair_reps[:, 1] - pair_reps[:, 0], both.n_tasks, level)
            l_ = difference_test(
                loss[b] - loss[a], rep_loss[:, b] - rep_loss[:, a], units["loss"], level
            )
            edge_tests.append((e, edge_sign))
            loss_tests.append((l_, loss_sign))
            comparisons.append({
                "from": points[a]["name"], "to": points[b]["name"],
                "tasks": [t for t, here in zip(names, shared, strict=True) if here],
                "edges_ratio": _finite(np.exp(edges_delta)),
                "edges_ratio_ci": None if e["ci"] is None else np.exp(e["ci"]).tolist(),
                "edges_p_claimed": e["p_below"] if edge_sign < 0 else e["p_above"],
                "loss_difference": float(loss[b] - loss[a]), "loss_difference_ci": l_["ci"],
                "loss_p_claimed": l_["p_below"] if loss_sign < 0 else l_["p_above"],
            })  # fmt: skip
        claims[name] = {
            "statement": statement,
            "comparisons": comparisons,
            "verdict": _verdict(edge_tests + loss_tests, level),
            "edges_verdict": _verdict(edge_tests, level),
            "loss_verdict": _verdict(loss_tests, level),
        }
    return {"points": per_point, "claims": claims, "level": level, "n_boot": n_boot,
            "common": [t for t, here in zip(names, common, strict=True) if here],
            "n_tasks": units["edges"], "n_documents": measures.n_docs}  # fmt: skip


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def pareto_optimal(loss: list[float], edges: list[float]) -> list[bool]:
    """Whether each point is on the frontier: no other point has both lower-or-equal loss and
    fewer-or-equal edges with one of them strictly lower."""
    out = []
    for i, (li, ei) in enumerate(zip(loss, edges, strict=True)):
        dominated = any(
            lj <= li and ej <= ei and (lj < li or ej < ei)
            for j, (lj, ej) in enumerate(zip(loss, edges, strict=True))
            if j != i
        )
        out.append(not dominated)
    return out
