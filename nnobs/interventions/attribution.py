"""Gradient attribution of a task's logit difference to input tokens and hook sites.

For an item with metric ``f`` (``logit[correct] - logit[incorrect]`` at the last position)
and the activation ``x`` at a site (``embed`` for input tokens):

- gradient × input: ``(x - x0) * grad f(x)``, a first-order estimate;
- integrated gradients: ``(x - x0) * integral_0^1 grad f(x0 + a (x - x0)) da``, computed by
  quadrature over ``a``. Its attributions sum to ``f(x) - f(x0)`` (completeness); the sum's
  gap to that difference is reported for every item, and by default the number of steps is
  doubled until the gap is within 1% of the difference.

The baseline ``x0`` is zero at the site, or the corrupted prompt's activation there (then
the attributions explain the clean-vs-corrupted difference). Attributions are summed over
the feature axis to one number per position, and for head and neuron sites also per unit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nnobs.core.errors import NnobsError
from nnobs.data.tasks import EncodedTask
from nnobs.interventions.targets import position_axis, result_document, site_kind
from nnobs.models.adapter import ModelAdapter

METHODS = ("ig", "grad_x_input")
RULES = ("auto", "gauss-legendre", "dyadic", "riemann", "trapezoid")
# The dyadic rule splits [0, 1] at 2^-1, ..., 2^-DYADIC_LEVELS: from a zero baseline through
# LayerNorms the metric changes on every scale of a down to ~1e-12 (each norm in its
# epsilon-dominated regime amplifies by 1/sqrt(eps)), which one Gauss-Legendre rule misses.
DYADIC_LEVELS = 48
BASELINES = ("zero", "corrupted")
# Completeness gaps below this are float32 round-off, whatever the relative size.
ABS_SLACK = 1e-5


@dataclass(frozen=True)
class AttributionSettings:
    """Every choice an attribution makes besides the site and items it attributes.

    ``method``: ``ig`` or ``grad_x_input``; ``baseline``: ``zero`` or ``corrupted`` (the
    corrupted prompt's activation); ``rule``, ``steps``, ``max_steps``: the quadrature of
    :func:`schedule` (``steps`` None: adaptive); ``tol``: the completeness tolerance;
    ``batch_size``: points of the path per forward pass.
    """

    method: str = "ig"
    baseline: str = "zero"
    rule: str = "auto"
    steps: int | None = None
    max_steps: int = 1024
    tol: float = 0.01
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise NnobsError(
                f"unknown attribution method {self.method!r}: choose {' or '.join(METHODS)}"
            )
        if self.baseline not in BASELINES:
            raise NnobsError(f"unknown baseline {self.baseline!r}: choose {' or '.join(BASELINES)}")
        if self.rule not in RULES:
            raise NnobsError(
                f"unknown quadrature rule {self.rule!r}: choose one of {', '.join(RULES)}"
            )
        if not 0 < self.tol < 1:
            raise NnobsError(f"tol must be in (0, 1), got {self.tol}")
        if self.steps is not None and self.steps < 1:
            raise NnobsError(f"steps must be a positive integer, got {self.steps}")


def quadrature(rule: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights on [0, 1] for ``steps`` gradient evaluations.

    ``dyadic`` is Gauss-Legendre with ``steps // (DYADIC_LEVELS + 1)`` nodes on each of
    [0, 2^-L], [2^-L, 2^-L+1], ..., [1/2, 1].
    """
    minimum = {"trapezoid": 2, "dyadic": DYADIC_LEVELS + 1}.get(rule, 1)
    if steps < minimum:
        raise NnobsError(f"the {rule} rule needs at least {minimum} steps, got {steps}")
    if rule == "gauss-legendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return (nodes + 1) / 2, weights / 2
    if rule == "dyadic":
        nodes, weights = np.polynomial.legendre.leggauss(steps // (DYADIC_LEVELS + 1))
        edges = np.concatenate([[0.0], 2.0 ** -np.arange(DYADIC_LEVELS, -1, -1)])
        lo, width = edges[:-1, None], np.diff(edges)[:, None]
        return (lo + width * (nodes + 1) / 2).ravel(), (width * weights / 2).ravel()
    if rule == "riemann":  # midpoint rule
        return (np.arange(steps) + 0.5) / steps, np.full(steps, 1.0 / steps)
    if rule == "trapezoid":
        weights = np.full(steps, 1.0 / (steps - 1))
        weights[[0, -1]] /= 2
        return np.linspace(0.0, 1.0, steps), weights
    raise NnobsError(f"unknown quadrature rule {rule!r}: choose one of {', '.join(RULES)}")


def _metric(logits: torch.Tensor, correct: int, incorrect: int) -> torch.Tensor:
    last = logits[:, -1].float()
    return last[:, correct] - last[:, incorrect]


def _value_at(adapter: ModelAdapter, ids: torch.Tensor, site: str, value, answers) -> float:
    """f with the site's activation replaced by ``value`` (None: left as it is)."""
    edits = {} if value is None else {site: lambda _x: value}
    logits, _ = adapter.run_with_cache(ids, [], edits=edits)
    return float(_metric(logits, *answers)[0])


def path_gradient(
    adapter: ModelAdapter,
    ids: torch.Tensor,
    site: str,
    x: torch.Tensor,
    x0: torch.Tensor,
    answers: tuple[int, int],
    alphas: np.ndarray,
    weights: np.ndarray,
    batch_size: int = 32,
) -> torch.Tensor:
    """``sum_k weights[k] * grad f(x0 + alphas[k] (x - x0))``, the gradient taken with
    respect to the site's activation; the points along the path run as one batch."""
    total = torch.zeros_like(x[0], dtype=torch.float32)
    for start in range(0, len(alphas), batch_size):
        a = torch.as_tensor(alphas[start : start + batch_size], dtype=x.dtype, device=x.device)
        w = torch.as_tensor(weights[start : start + batch_size], dtype=torch.float32)
        shape = (len(a),) + (1,) * (x.dim() - 1)
        point = (x0 + a.view(shape) * (x - x0)).detach().requires_grad_(True)
        with torch.enable_grad(), adapter.hooks(edits={site: lambda _x, p=point: p}):
            logits = adapter.forward(ids.expand(len(a), -1))
            (grad,) = torch.autograd.grad(_metric(logits, *answers).sum(), point)
        total += (w.to(grad.device).view(shape) * grad.float()).sum(0)
    return total


def _reduce(attr: torch.Tensor, site: str) -> tuple[list[float], list[float] | None]:
    """Attribution per position, and per head / neuron where the site has such units."""
    kind = site_kind(site)
    per_position = attr.flatten(1).sum(1) if attr.dim() > 1 else attr
    units = None
    if kind == "head_out":
        units = attr.sum(dim=(0, 2)).tolist()
    elif kind == "mlp_hidden":
        units = attr.sum(0).tolist()
    return per_position.tolist(), units


def schedule(
    method: str, rule: str, steps: int | None, max_steps: int
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The quadratures to try in order, each a (rule, nodes, weights); the first that
    passes the completeness check is kept.

    ``auto``: Gauss-Legendre with 16, 32, 64 nodes (enough for a smooth path), then the
    dyadic rule with 2, 4, 8, ... nodes per interval (a path from zero through LayerNorms),
    every try within ``max_steps``. Another rule doubles its steps from 16; fixed ``steps``
    is one try. Gradient × input is the gradient at the input alone.
    """
    if method == "grad_x_input":
        return [("none", np.ones(1), np.ones(1))]
    if steps is not None:
        tries = [("gauss-legendre" if rule == "auto" else rule, steps)]
    elif rule == "auto":
        per_level = DYADIC_LEVELS + 1
        tries = [("gauss-legendre", n) for n in (16, 32, 64)]
        tries += [("dyadic", n * per_level) for n in (2, 4, 8, 16, 32)]
    else:
        tries = [(rule, n) for n in (16, 32, 64, 128, 256, 512, 1024, 2048)]
    tries = [(r, n) for r, n in tries if n <= max_steps] or [tries[0]]
    return [(r, *quadrature(r, n)) for r, n in tries]


def attribute_item(
    adapter: ModelAdapter,
    task: EncodedTask,
    item: int,
    site: str = "embed",
    settings: AttributionSettings | None = None,
) -> dict:
    """Attribute item ``item``'s logit difference to the activation at ``site``.

    For ``ig`` the quadratures of :func:`schedule` are tried in turn until the completeness
    gap ``|sum(attributions) - (f(x) - f(x0))|`` is within ``tol`` of ``|f(x) - f(x0)|``;
    the achieved gap, the rule and the number of steps are reported either way.
    """
    settings = settings or AttributionSettings()
    dev = adapter.device
    ids = torch.tensor([task.clean[item]], dtype=torch.long, device=dev)
    answers = (task.correct[item], task.incorrect[item])
    _, cache = adapter.run_with_cache(ids, [site])
    x = cache[site]
    if settings.baseline == "zero":
        x0 = torch.zeros_like(x)
    else:
        corrupted = torch.tensor([task.corrupted[item]], dtype=torch.long, device=dev)
        _, cache0 = adapter.run_with_cache(corrupted, [site])
        x0 = cache0[site]
    f_x = _value_at(adapter, ids, site, None, answers)
    f_x0 = _value_at(adapter, ids, site, x0, answers)
    target = f_x - f_x0
    for quadrature_try in schedule(
        settings.method, settings.rule, settings.steps, settings.max_steps
    ):
        used, alphas, weights = quadrature_try
        grad = path_gradient(
            adapter, ids, site, x, x0, answers, alphas, weights, settings.batch_size
        )
        attr = ((x - x0)[0].float() * grad).cpu()
        total = float(attr.sum())
        gap = abs(total - target)
        complete = gap <= settings.tol * abs(target) + ABS_SLACK
        if complete:
            break
    per_position, units = _reduce(attr, site)
    return {
        "item": item,
        "tokens": task.token_strs[item],
        "f_input": f_x,
        "f_baseline": f_x0,
        "attribution_sum": total,
        "abs_error": gap,
        "rel_error": gap / abs(target) if target else None,
        "complete": bool(complete),
        "rule": used,
        "steps": len(alphas),
        "per_position": per_position,
        "per_unit": units,
    }


def attribute(
    adapter: ModelAdapter,
    task: EncodedTask,
    site: str = "embed",
    settings: AttributionSettings | None = None,
    *,
    items: Sequence[int] | None = None,
) -> dict:
    """Attribute every item (or ``items``) of ``task`` to ``site``; returns a result document
    whose ``completeness`` block summarises the gaps (IG: within ``tol`` for every item?)."""
    settings = settings or AttributionSettings()
    adapter.resolve(site)
    if position_axis(site) != 1:
        raise NnobsError(f"cannot attribute to {site!r}: choose a site with positions on axis 1")
    chosen = list(range(len(task))) if items is None else list(items)
    for i in chosen:
        if not 0 <= i < len(task):
            raise NnobsError(f"item {i} is out of range: the task has {len(task)} items")
        if settings.baseline == "corrupted" and len(task.clean[i]) != len(task.corrupted[i]):
            raise NnobsError(
                f"item {i}: the corrupted baseline needs prompts of equal token length "
                f"({len(task.clean[i])} vs {len(task.corrupted[i])}); use the zero baseline"
            )
    attributed = [attribute_item(adapter, task, i, site, settings) for i in chosen]
    rel = [r["rel_error"] for r in attributed if r["rel_error"] is not None]
    completeness = {
        "tol": settings.tol,
        "all_within_tol": all(r["complete"] for r in attributed),
        "max_rel_error": max(rel) if rel else None,
        "max_abs_error": max(r["abs_error"] for r in attributed),
        "max_steps_used": max(r["steps"] for r in attributed),
    }
    recorded = {
        "method": settings.method,
        "site": site,
        "baseline": settings.baseline,
        "rule": settings.rule if settings.method == "ig" else None,
        "steps": settings.steps,
        "max_steps": settings.max_steps,
        "batch_size": settings.batch_size,
    }
    return result_document(
        adapter,
        "attribution",
        recorded,
        task=task.describe(),
        completeness=completeness,
        items=attributed,
    )
