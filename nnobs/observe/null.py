"""The verdict's null: the protocol's headline measured on random-init models.

A randomly initialised model of the same architecture has learned nothing, yet its probes
still find some pcorr: its residual stream computes its own (untrained) loss, and a linear
readout of that is not confidence. "The trained model keeps a signal" therefore means "its
headline is above what random-init models of its architecture give", measured where the
headline is measured: the reported layer's site, the same probe-training and test tokens, the
same seeds, label and ensemble. Each of ``null_models`` init seeds gives one value with its
own sampling standard deviation (test documents and probe training, as for the headline);
:func:`nnobs.measure.nulltest.compare_to_null` turns them into the floor and a p-value. One
model (the default: its capture costs what the protocol's old detection floor did) cannot
show how much init seeds differ beyond sampling noise; the test then assumes they do not,
and two or more models measure it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from nnobs.core.errors import NnobsError
from nnobs.data.corpus import Document
from nnobs.measure.nulltest import compare_to_null
from nnobs.models.adapter import ModelAdapter
from nnobs.observe.settings import ObserveSettings
from nnobs.observe.signal import fit_seed_probes
from nnobs.observe.splits import capture_splits
from nnobs.observe.stages import evaluate_on_test

NULL_SOURCE = "random-init models of the same architecture (one per init seed)"


def headline_against_null(
    headline: dict[str, Any], nulls: list[dict[str, Any]], level: float
) -> dict[str, Any]:
    """The test of a headline record (``ensemble``, ``ensemble_sd``) against null records of
    the same shape (:func:`nnobs.measure.nulltest.compare_to_null`)."""
    return compare_to_null(
        headline["ensemble"],
        headline["ensemble_sd"],
        [m["ensemble"] for m in nulls],
        [m["ensemble_sd"] for m in nulls],
        level,
    )


def random_init_null(
    adapter: ModelAdapter,
    docs: dict[str, list[Document]],
    layer: int,
    site: str,
    headline: dict[str, Any],
    settings: ObserveSettings,
    work_dir: Path,
    progress: bool,
    log: Callable[[str], None],
) -> dict[str, Any] | None:
    """The null record and the test of ``headline`` (an :func:`evaluate_on_test` record)
    against it; None when ``settings.null_models`` is 0."""
    from nnobs.models.load import random_init_like

    if settings.null_models == 0:
        return None
    split_docs = {"train": docs["train"], "test": docs["test"]}
    models = []
    for seed in range(settings.null_models):
        log(f"null: random-init model {seed + 1}/{settings.null_models}")
        fresh = random_init_like(adapter, seed=seed)
        data = capture_splits(
            fresh, split_docs, [site], settings, work_dir, progress, f"null{seed}-"
        )
        train, test = data["train"], data["test"]
        try:
            probes = fit_seed_probes(train, site, settings.seeds, str(fresh.device), settings.label)
            record, _, _ = evaluate_on_test(probes, test, layer, site, settings)
        except NnobsError as err:
            raise NnobsError(f"the random-init null could not be measured: {err}") from err
        models.append(
            {
                "init_seed": seed,
                "ensemble": record["ensemble"],
                "ensemble_sd": record["ensemble_sd"],
                "per_seed": record["per_seed"],
            }
        )
    test = headline_against_null(headline, models, settings.level)
    return {
        "source": NULL_SOURCE,
        "layer": layer,
        "site": site,
        "split": "test",
        "statistic": "the headline: the seed ensemble's pcorr on the test split",
        "models": models,
        **test,
    }
