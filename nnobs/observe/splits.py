"""The protocol's data: which sites and tokens it reads, and each split's captured tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnobs.core.errors import NnobsError
from nnobs.data.corpus import Corpus, Document
from nnobs.data.windows import (
    DEFAULT_SEQ_LEN,
    REFERENCE_OPENING,
    Windows,
    split_windows,
    window_length,
)
from nnobs.measure import stats
from nnobs.models.adapter import ModelAdapter
from nnobs.observe.capture import Capture, capture
from nnobs.observe.settings import ObserveSettings


@dataclass
class SplitData:
    """One split's captured tokens, with the columns every statistic needs."""

    name: str
    cap: Capture
    _controlled: dict[str, stats.PartialSpearman] = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return len(self.cap.loss)

    def acts(self, site: str) -> np.ndarray:
        return self.cap.acts[site]

    def covariates(self, site: str, *extra: np.ndarray) -> np.ndarray:
        """The standard controls (max softmax, the site's norm) plus any extra columns."""
        return np.column_stack([self.cap.max_softmax, self.cap.norms[site], *extra])

    def controlled(self, site: str) -> stats.PartialSpearman:
        """pcorr against this split's loss under the standard controls, prepared once per site
        (every probe and seed scored here shares the ranking of loss and covariates)."""
        if site not in self._controlled:
            self._controlled[site] = stats.PartialSpearman(self.cap.loss, self.covariates(site))
        return self._controlled[site]


def model_trained_on(adapter: ModelAdapter, corpus: Corpus) -> bool:
    """Whether the model's training split is this corpus's training split.

    True for the same content, and for the same spec (a run capped by ``max_chars`` trained on a
    subset of the same hash-assigned training documents).
    """
    prov = adapter.provenance
    return prov.get("corpus_fingerprint") == corpus.fingerprint or (
        prov.get("corpus_spec") is not None and prov.get("corpus_spec") == corpus.name
    )


def layer_sites(adapter: ModelAdapter, settings: ObserveSettings) -> dict[int, str]:
    """The probed site of each layer the settings name (every layer by default), keyed by its
    index: a negative layer counts from the end, and results name the layer it resolved to."""
    layers = settings.layers if settings.layers is not None else range(adapter.n_layers)
    sites = {}
    for layer in layers:
        site = adapter.site_name(layer, settings.site_kind)  # refuses a layer out of range
        sites[layer % adapter.n_layers] = site
    return sites


def final_site(adapter: ModelAdapter) -> str:
    """The last block's residual stream: what the output-control predictor reads."""
    return adapter.site_name(adapter.n_layers - 1, "resid_post")


def token_windows(
    adapter: ModelAdapter,
    docs: dict[str, list[Document]],
    settings: ObserveSettings,
    max_doc_tokens: int | None = None,
) -> dict[str, Windows]:
    """Each split's token windows at the token budget (ex_per_dim × d_model tokens), drawn as
    ``settings.sampling`` says (:func:`nnobs.data.windows.document_windows`): "spread", with
    at most ``max_doc_tokens`` from any one document, by default the cap that spreads the
    budget over every document of the split; "reference", the openings of the shortest
    documents, in windows of up to the reference's opening length unless ``seq_len`` is set.
    Windows start with the tokenizer's BOS where it adds one (never a scored target).

    They depend on the tokenizer, width and context only, so checkpoints of one run share them.
    """
    if adapter.tokenizer is None:
        raise NnobsError("the model has no tokenizer; load it from a directory that has one")
    default = REFERENCE_OPENING if settings.sampling == "reference" else DEFAULT_SEQ_LEN
    return split_windows(
        docs,
        adapter.tokenizer,
        window_length(adapter.context_length, settings.seq_len, default),
        settings.token_budget(adapter.d_model),
        seed=settings.window_seed,
        max_doc_tokens=max_doc_tokens,
        bos=adapter.tokenizer.bos_id,
        sampling=settings.sampling,
    )


def capture_splits(
    adapter: ModelAdapter,
    docs: dict[str, list[Document]],
    sites: list[str],
    settings: ObserveSettings,
    work_dir: Path | None,
    progress: bool,
    label: str = "",
    windows: dict[str, Windows] | None = None,
) -> dict[str, SplitData]:
    """Capture ``sites`` on each split (windows from :func:`token_windows` unless given);
    ``work_dir`` None keeps the arrays in memory."""
    windows = windows if windows is not None else token_windows(adapter, docs, settings)
    dtype = np.float16 if settings.store_dtype == "float16" else np.float32
    out = {}
    for split in docs:
        cap = capture(
            adapter,
            windows[split],
            sites,
            batch_size=settings.batch_size,
            dtype=dtype,
            directory=None if work_dir is None else work_dir / f"{label}{split}",
            progress=progress,
            desc=f"capture {label}{split}",
        )
        out[split] = SplitData(split, cap)
    return out
