"""A run derived from another (fine-tuned, grown): a new run directory whose checkpoint 0
holds the given weights, so training it is resuming a run from step 0 with the ordinary
trainer; ``run.json`` and the checkpoint name the parent under ``parent_key``."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from nnobs.core.files import write_json
from nnobs.core.rundir import RunDir
from nnobs.models.config import ModelConfig
from nnobs.training.checkpoint import save_checkpoint
from nnobs.training.config import TrainConfig
from nnobs.training.resume import write_run
from nnobs.training.tokens import TokenStreams, unigram_loss
from nnobs.training.trainer import build_optimizer


def write_derived_run(
    out: Path,
    model: torch.nn.Module,
    mc: ModelConfig,
    tc: TrainConfig,
    streams: TokenStreams,
    parent_key: str,
    provenance: dict[str, Any],
) -> None:
    """run.json, tokenizer and checkpoint 0 (a fresh optimizer), assembled beside ``out``
    (absent or empty) and renamed into place, so a failure leaves nothing half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        baseline = unigram_loss(streams.train, streams.validation, mc.vocab_size)
        run = write_run(tmp, mc, tc, streams, baseline)
        run[parent_key] = provenance
        write_json(RunDir(tmp).run_file, run)
        meta = {
            "tokenizer": run["tokenizer"],
            "corpus": {"spec": tc.corpus, "fingerprint": streams.corpus.fingerprint},
            "seed": tc.seed,
            "tokens_seen": 0,
            "val_loss": None,
            "elapsed_s": 0.0,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            parent_key: provenance,
        }
        save_checkpoint(tmp, 0, model, meta, build_optimizer(model, tc, torch.device("cpu")))
        if out.exists():
            out.rmdir()  # empty: the callers check it before any work
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
