"""Feature dashboards: what each feature of a site responds to and what it does, from one
streamed pass over a corpus.

For every feature of a :class:`~nnobs.features.sources.FeatureSource` at once, one forward pass
per batch of windows updates bounded per-feature state, so memory does not grow with the
number of tokens:

- the ``top_k`` highest activations, each with its context (the tokens before and after and
  the feature's activation on each) — a heap per feature, kept as a (features × k) table
  merged with each batch's own top k;
- a uniform random sample of the positions where it is active (priority sampling: every
  active position draws a random key and the largest ``sample_size`` keys are kept, merged the
  same way), from which samples are shown per activation-quantile bin;
- how often it is active (density), its mean and its maximum.

Then, per feature, the tokens it promotes and suppresses through the unembedding
(:func:`~nnobs.features.sources.direct_logits`), and for the densest features the causal effect
of mean-ablating it on next-token loss, with a bootstrap interval over documents.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from nnobs.core.errors import NnobsError
from nnobs.core.fields import check_int
from nnobs.data.windows import Windows
from nnobs.features.sources import FeatureSource, direct_logits
from nnobs.features.stream import SiteBatch, site_batches
from nnobs.measure import stats
from nnobs.models.adapter import ModelAdapter
from nnobs.observe.capture import capture


@dataclass(frozen=True)
class DashboardSettings:
    """How much each dashboard shows and measures (stored in the result)."""

    top_k: int = 10
    n_bins: int = 4
    per_bin: int = 2
    sample_size: int = 40
    before: int = 12
    after: int = 4
    n_logit_tokens: int = 8
    n_ablate: int = 16
    batch_size: int = 16
    n_boot: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("top_k", "n_bins", "per_bin", "sample_size", "n_logit_tokens"):
            check_int(name, getattr(self, name), 1)
        for name in ("before", "after", "n_ablate", "seed"):
            check_int(name, getattr(self, name), 0)
        check_int("batch_size", self.batch_size, 1)
        check_int("n_boot", self.n_boot, 2)


class BestEntries:
    """Per feature, the ``size`` entries with the largest score seen so far, and what was
    recorded with them: a heap per feature, as one (features × size) table."""

    def __init__(self, n_features: int, size: int, context: int) -> None:
        self.score = torch.full((n_features, size), -torch.inf)
        self.act = torch.zeros(n_features, size)
        self.where = torch.full((n_features, size, 2), -1, dtype=torch.long)  # (row, position)
        self.ctx_acts = torch.zeros(n_features, size, context)
        self.ctx_ids = torch.full((n_features, size, context), -1, dtype=torch.long)

    def offer(self, score: torch.Tensor, act, where, ctx_acts, ctx_ids) -> None:
        """Merge candidates (features × m, each field shaped like the table's) into the table."""
        size = self.score.shape[1]
        merged = torch.cat([self.score, score], 1)
        best = merged.topk(size, dim=1).indices
        self.score = merged.gather(1, best)
        self.act = torch.cat([self.act, act], 1).gather(1, best)
        for name, new in (("where", where), ("ctx_acts", ctx_acts), ("ctx_ids", ctx_ids)):
            table = torch.cat([getattr(self, name), new], 1)
            index = best[..., None].expand(-1, -1, table.shape[2])
            setattr(self, name, table.gather(1, index))


class _Pass:
    """The streamed pass's state; :meth:`update` takes one batch's feature activations."""

    def __init__(self, source: FeatureSource, settings: DashboardSettings) -> None:
        n, s = source.n_features, settings
        self.source, self.settings = source, s
        self.context = s.before + 1 + s.after
        self.top = BestEntries(n, s.top_k, self.context)
        self.sample = BestEntries(n, s.sample_size, self.context)
        self.active = torch.zeros(n, dtype=torch.long)
        self.total = torch.zeros(n, dtype=torch.float64)
        self.peak = torch.full((n,), -torch.inf)
        self.n_tokens = 0
        self.generator = torch.Generator().manual_seed(s.seed)

    def update(self, batch: SiteBatch) -> None:
        b, t, _ = batch.acts.shape
        valid = batch.valid.cpu()
        feats = self.source.encode(batch.acts.flatten(0, 1)).float().cpu().view(b, t, -1)
        flat, mask = feats.flatten(0, 1), valid.flatten()
        real = flat[mask]
        if len(real) == 0:
            return
        self.active += (real > 0).sum(0)
        self.total += real.double().sum(0)
        self.peak = torch.maximum(self.peak, real.amax(0))
        self.n_tokens += len(real)
        score = torch.where(mask[:, None], flat, -torch.inf)
        keys = torch.rand(flat.shape, generator=self.generator)
        keys = torch.where(mask[:, None] & (flat > 0), keys, -torch.inf)
        ids = torch.where(valid, batch.input_ids.cpu(), -1)
        for table, ranking in ((self.top, score), (self.sample, keys)):
            m = min(table.score.shape[1], len(flat))
            pick = ranking.T.topk(m, dim=1).indices  # (features, m) flat positions
            self._offer(table, ranking, feats, ids, pick, batch.first_row)

    def _offer(self, table, ranking, feats, ids, pick, first_row: int) -> None:
        s, (_, t, n) = self.settings, feats.shape
        rows, pos = pick // t, pick % t
        offsets = torch.arange(-s.before, s.after + 1)
        at = pos[..., None] + offsets  # (features, m, context)
        inside = (at >= 0) & (at < t)
        at = at.clamp(0, t - 1)
        row = rows[..., None].expand_as(at)
        feature = torch.arange(n)[:, None, None].expand_as(at)
        ctx_acts = torch.where(inside, feats[row, at, feature], 0.0)
        ctx_ids = torch.where(inside, ids[row, at], -1)
        where = torch.stack([rows + first_row, pos], -1)
        score = ranking.T.gather(1, pick)
        table.offer(score, feats.flatten(0, 1).T.gather(1, pick), where, ctx_acts, ctx_ids)


def _examples(table: BestEntries, f: int, order, before: int, windows: Windows, piece) -> list:
    """The table's entries for feature ``f`` (in ``order``) as dashboard examples: the context's
    tokens and activations, and ``at``, the index of the token the entry is about."""
    out = []
    for j in order:
        if not np.isfinite(float(table.score[f, j])):
            continue
        row, pos = (int(v) for v in table.where[f, j])
        ids = table.ctx_ids[f, j].tolist()
        keep = [i for i, tok in enumerate(ids) if tok >= 0]
        out.append(
            {
                "act": round(float(table.act[f, j]), 5),
                "doc": int(windows.doc_ids[row]),
                "position": int(windows.starts[row]) + pos,
                "tokens": [piece(ids[i]) for i in keep],
                "acts": [round(float(table.ctx_acts[f, j, i]), 4) for i in keep],
                "at": keep.index(before),
            }
        )
    return out


def _quantile_bins(sample: BestEntries, f: int, settings: DashboardSettings, windows, piece):
    """Samples from ``n_bins`` bins of the feature's activation quantiles (bin edges from the
    uniform sample of its active positions), ``per_bin`` each."""
    values = sample.act[f]
    live = torch.isfinite(sample.score[f]).nonzero().squeeze(1)
    if len(live) == 0:
        return []
    edges = np.quantile(values[live].numpy(), np.linspace(0, 1, settings.n_bins + 1))
    bins = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = [int(j) for j in live if lo <= float(values[j]) <= hi][: settings.per_bin]
        examples = _examples(sample, f, inside, settings.before, windows, piece)
        bins.append({"lo": float(lo), "hi": float(hi), "examples": examples})
    return bins


def _logit_tokens(
    adapter: ModelAdapter, source: FeatureSource, n: int, piece, chunk: int = 256
) -> list[dict] | None:
    """Per feature, the ``n`` tokens it promotes and suppresses most (None: not known);
    ``chunk`` features at a time, so no (features × vocab) matrix is held."""
    out = []
    for first in range(0, source.n_features, chunk):
        logits = direct_logits(adapter, source, slice(first, first + chunk))
        if logits is None:
            return None
        k = min(n, logits.shape[1])
        up, down = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
        for f in range(len(logits)):
            out.append(
                {
                    "promoted": [[piece(int(i)), round(float(v), 4)]
                                 for v, i in zip(up.values[f], up.indices[f], strict=True)],
                    "suppressed": [[piece(int(i)), round(float(v), 4)]
                                   for v, i in zip(down.values[f], down.indices[f], strict=True)],
                }
            )  # fmt: skip
    return out


def ablation_effects(
    adapter: ModelAdapter,
    source: FeatureSource,
    indices: list[int],
    means: torch.Tensor,
    windows: Windows,
    settings: DashboardSettings,
) -> dict[int, dict[str, Any]]:
    """For each feature in ``indices``: the change in mean next-token loss when it is set to its
    mean everywhere, with a percentile bootstrap interval over documents."""

    def losses(edits):
        run = capture(
            adapter, windows, [], batch_size=settings.batch_size, progress=False, edits=edits
        )
        return np.asarray(run.loss, dtype=np.float64), np.asarray(run.doc_ids)

    clean, docs = losses(None)
    out = {}
    for f in indices:
        ablated, _ = losses({source.site: source.ablate_edit(f, float(means[f]))})
        delta = ablated - clean
        lo, hi = stats.bootstrap_ci(
            np.mean, delta, n_boot=settings.n_boot, seed=settings.seed, groups=docs
        )
        out[f] = {
            "delta": float(delta.mean()),
            "ci95": [lo, hi],
            "n_tokens": int(len(delta)),
            "n_documents": int(len(np.unique(docs))),
        }
    return out


def stream_pass(
    adapter: ModelAdapter,
    source: FeatureSource,
    windows: Windows,
    settings: DashboardSettings,
    progress: bool = False,
) -> _Pass:
    """The one streamed pass over ``windows`` for every feature of ``source``."""
    state = _Pass(source, settings)
    bar = tqdm(
        total=len(windows.input_ids),
        desc="features",
        unit="window",
        disable=not progress,
        leave=False,
    )
    with bar:
        for batch in site_batches(adapter, windows, source.site, settings.batch_size):
            state.update(batch)
            bar.update(len(batch.acts))
    if state.n_tokens == 0:
        raise NnobsError("no valid token positions in the windows")
    return state


def feature_dashboards(
    adapter: ModelAdapter,
    source: FeatureSource,
    windows: Windows,
    settings: DashboardSettings,
    ablate_windows: Windows | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Every feature's dashboard (see the module doc), as the body of a features result."""
    start = time.perf_counter()
    state = stream_pass(adapter, source, windows, settings, progress)
    seconds = time.perf_counter() - start
    tok = adapter.tokenizer
    piece = tok.token_str if tok is not None else str
    density = (state.active.double() / state.n_tokens).numpy()
    means = (state.total / state.n_tokens).float()
    chosen = [
        int(f) for f in np.argsort(-density, kind="stable")[: settings.n_ablate] if density[f] > 0
    ]
    effects = {}
    if ablate_windows is not None and chosen:
        effects = ablation_effects(adapter, source, chosen, means, ablate_windows, settings)
    logits = _logit_tokens(adapter, source, settings.n_logit_tokens, piece)
    features = []
    for f in range(source.n_features):
        order = state.top.score[f].argsort(descending=True).tolist()
        features.append(
            {
                "index": f,
                "label": source.labels[f] if source.labels else None,
                "density": float(density[f]),
                "mean": float(means[f]),
                "max": float(state.peak[f]),
                "top": _examples(state.top, f, order, settings.before, windows, piece),
                "quantiles": _quantile_bins(state.sample, f, settings, windows, piece),
                "logits": None if logits is None else logits[f],
                "ablation": effects.get(f),
            }
        )
    return {
        "settings": asdict(settings),
        "source": source.describe(),
        "n_tokens": state.n_tokens,
        "stream": {
            "seconds": round(seconds, 3),
            "tokens_per_second": round(state.n_tokens / seconds, 1),
        },
        "features": features,
    }
