"""The persistence experiment, one command: does a representation planted in a small model
survive when the model is grown and trained on?

Per training seed ``s`` (all runs share one data order):

- ``small_aux/seed_s``: the small model trained with the auxiliary attribute head;
- ``small_noaux/seed_s``: the small model trained on the next-token loss alone;
- ``large_seeded_aux/seed_s``, ``large_seeded_noaux/seed_s``: the large model grown from each
  (:mod:`nnobs.seeding.grow`) and trained on the next-token loss alone;
- ``large_random/seed_s``: the large model from a random init (the same random weights the
  grown models' new units have).

Every checkpoint of every run is probed for the attribute at every layer on held-out tokens
(:mod:`nnobs.seeding.probing`), and the gaps between large conditions are analysed as
declared in :mod:`nnobs.seeding.analysis`. Each step is kept on disk (runs resume, grown runs
and probe scores are not redone), so re-running the same command resumes the experiment.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from nnobs.core.errors import NnobsError
from nnobs.core.files import read_json, write_json
from nnobs.core.rundir import RunDir
from nnobs.core.version import __version__
from nnobs.data.corpus import load_corpus
from nnobs.seeding.analysis import DECAY_MODEL, EARLY_FRACTION, SENSITIVITY_MODELS, analyse
from nnobs.seeding.aux import AttributeHead, attribute_stream
from nnobs.seeding.config import SeedingConfig
from nnobs.seeding.grown_run import grow_run
from nnobs.seeding.probing import probe_run
from nnobs.training.tokens import load_streams
from nnobs.training.trainer import train

log = logging.getLogger("nnobs.seeding")

CONDITIONS = ("small_aux", "small_noaux", "large_random", "large_seeded_aux", "large_seeded_noaux")
SEEDED_FROM = {"large_seeded_aux": "small_aux", "large_seeded_noaux": "small_noaux"}
# name: (condition, baseline). The first is the question; the others are its controls.
COMPARISONS = {
    "seeded_aux_vs_random": ("large_seeded_aux", "large_random"),
    "seeded_noaux_vs_random": ("large_seeded_noaux", "large_random"),
    "aux_vs_noaux_seeded": ("large_seeded_aux", "large_seeded_noaux"),
}
QUESTION = (
    "Does an attribute representation planted in a small model by an auxiliary task persist "
    "when the model is grown exactly and trained on without that task?"
)


class SeedingExperiment:
    """Runs (or resumes) the experiment of ``config`` in ``out``; :meth:`run` returns the
    result document."""

    def __init__(
        self, config: SeedingConfig, out: Path, progress: Callable[[str], None] = log.info
    ) -> None:
        self.config, self.out, self.say = config, Path(out), progress
        self.settings = config.settings
        self._labels: np.ndarray | None = None
        self._probe_docs: dict[str, list] | None = None
        self.grown: list[dict[str, Any]] = []

    def run_dir(self, condition: str, seed: int) -> Path:
        return self.out / condition / f"seed_{seed}"

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        results: dict[str, list[dict]] = {c: [] for c in CONDITIONS}
        for seed in self.settings.seeds:
            for condition in CONDITIONS:
                self.train_condition(condition, seed)
                results[condition].append(self.probed(condition, seed))
        return self.document(results, time.perf_counter() - started)

    # ------------------------------------------------------------------------- training

    def train_condition(self, condition: str, seed: int) -> None:
        size = "small" if condition.startswith("small") else "large"
        mc, tc = self.config.run_configs(size, seed)
        out = self.run_dir(condition, seed)
        if condition in SEEDED_FROM and not RunDir(out).is_run():
            self.say(f"growing {SEEDED_FROM[condition]}/seed_{seed} into {condition}")
            parent = self.run_dir(SEEDED_FROM[condition], seed)
            grown = grow_run(parent, mc, tc, out, self.settings.layer_map)
            self.grown.append({"condition": condition, "seed": seed, **grown})
        elif condition in SEEDED_FROM:
            grown = RunDir(out).read_run()["grown_from"]
            self.grown.append({"condition": condition, "seed": seed, **grown})
        extra = self.aux_head(mc, tc) if condition == "small_aux" else None
        self.say(f"training {condition}/seed_{seed}")
        train(mc, tc, out, progress=False, extra=extra)

    def aux_head(self, mc, tc) -> AttributeHead:
        """The auxiliary head of a small run, its labels made once for the experiment."""
        s = self.settings
        if self._labels is None:
            streams = load_streams(tc, mc, RunDir(self.run_dir("small_aux", s.seeds[0])), None)
            self._labels = attribute_stream(streams.corpus.train, streams.tokenizer, s.attribute)
            if len(self._labels) != len(streams.train):  # they must follow the stream exactly
                raise NnobsError(
                    f"attribute labels cover {len(self._labels)} tokens, the stream "
                    f"{len(streams.train)}"
                )
        return AttributeHead(self._labels, s.attribute, s.aux_layer, s.aux_weight, mc.d_model)

    # -------------------------------------------------------------------------- probing

    def probed(self, condition: str, seed: int) -> dict[str, Any]:
        """The run's probe scores, computed once and kept in ``probes/``."""
        path = self.out / "probes" / condition / f"seed_{seed}.json"
        if path.is_file():
            return read_json(path, "probe scores")
        self.say(f"probing {condition}/seed_{seed} at every checkpoint")
        s = self.settings
        size = "small" if condition.startswith("small") else "large"
        seq_len = self.config.run_configs(size, seed)[1].seq_len
        scores = probe_run(
            self.run_dir(condition, seed), self.probe_docs(), s.attribute, s.metric,
            tokens=s.probe_tokens, seq_len=seq_len, alpha=s.probe_alpha,
        )  # fmt: skip
        write_json(path, scores)
        return scores

    def probe_docs(self) -> dict[str, list]:
        """The corpus's test documents, halved: probes fit on one half and are scored on the
        other. Splits go by document id, whatever ``max_chars`` keeps, so the whole test split
        is held out from training; it gives the probes many files even when the runs train
        on a small slice."""
        if self._probe_docs is None:
            test = load_corpus(self.config.small[1].corpus).test
            self._probe_docs = {"fit": test[0::2], "score": test[1::2]}
        return self._probe_docs

    # ------------------------------------------------------------------------- analysis

    def document(self, results: dict[str, list[dict]], wall_s: float) -> dict[str, Any]:
        s = self.settings
        conditions = {
            c: {
                "runs": [str(self.run_dir(c, seed)) for seed in s.seeds],
                "steps": runs[0]["steps"],
                "scores": [r["scores"] for r in runs],
                "val_loss": [r["val_loss"] for r in runs],
            }
            for c, runs in results.items()
        }
        steps = np.array(conditions["large_random"]["steps"])
        scores = {c: np.array(conditions[c]["scores"], np.float64) for c in CONDITIONS[2:]}
        comparisons = analyse(
            scores, steps, COMPARISONS, n_boot=s.n_boot, confidence=s.confidence, seed=0
        )
        return {
            "schema": "nnobs.seeding",
            "schema_version": 1,
            "nnobs_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "question": QUESTION,
            "config": self.config.to_dict(),
            "plan": {
                "decay_model": DECAY_MODEL,
                "sensitivity_models": list(SENSITIVITY_MODELS),
                "early_fraction": EARLY_FRACTION,
                "confidence": s.confidence,
                "interval": "expanded percentile bootstrap over training seeds (paired)",
                "verdict": "persists: asymptote interval above 0; decays: early-gap interval "
                "above 0 otherwise; absent: neither",
                "primary": "seeded_aux_vs_random",
            },
            "attribute": s.attribute,
            "metric": s.metric,
            "steps": steps.tolist(),
            "conditions": conditions,
            "comparisons": comparisons,
            "grown": self.grown,
            "wall_s": round(wall_s, 1),
        }
