"""The tokens a run trains and evaluates on: corpus, tokenizer, token streams, the fixed
validation windows, and the unigram baseline a trained model must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nnobs.core.errors import NnobsError
from nnobs.core.rundir import RunDir
from nnobs.data.corpus import Corpus
from nnobs.models.checkpoint import load_run_tokenizer
from nnobs.models.config import ModelConfig
from nnobs.training.config import TrainConfig
from nnobs.training.schedule import eval_starts


@dataclass
class TokenStreams:
    """A run's corpus, its tokenizer and the token ids of the training and validation splits."""

    corpus: Corpus
    tokenizer: Any
    train: np.ndarray
    validation: np.ndarray


@dataclass
class TrainingData:
    """The tokens on the training device."""

    train: torch.Tensor  # the training token stream
    val_windows: torch.Tensor  # (n, seq_len + 1) fixed validation windows
    n_train: int


def load_streams(
    tc: TrainConfig, mc: ModelConfig, run_dir: RunDir, tokenizer_ref: dict | None
) -> TokenStreams:
    """Corpus, tokenizer and token streams; a resumed run (``tokenizer_ref`` given) reads the
    run's own tokenizer instead of building one again."""
    from nnobs.data.corpus import load_corpus
    from nnobs.data.encoding import token_stream
    from nnobs.data.tokenizer import get_tokenizer

    corpus = load_corpus(tc.corpus, max_chars=tc.max_chars)
    if tokenizer_ref is not None:
        tokenizer = load_run_tokenizer(run_dir, tokenizer_ref)
    else:
        tokenizer = get_tokenizer(tc.tokenizer, corpus, mc.vocab_size)
    if tokenizer.vocab_size > mc.vocab_size:
        raise NnobsError(
            f"the {tokenizer.kind} tokenizer has {tokenizer.vocab_size} tokens but "
            f"model.vocab_size is {mc.vocab_size}: set model.vocab_size={tokenizer.vocab_size}"
        )
    train_ids = token_stream(corpus.train, tokenizer)
    val_ids = token_stream(corpus.validation, tokenizer)
    for split, ids in (("training", train_ids), ("validation", val_ids)):
        if len(ids) < tc.seq_len + 2:
            raise NnobsError(
                f"the {split} split of corpus {tc.corpus!r} has {len(ids)} tokens, fewer than "
                f"one window of seq_len={tc.seq_len}: use a larger corpus or max_chars, or a "
                "smaller seq_len"
            )
    check_batch_fits(tc, len(train_ids), len(val_ids))
    return TokenStreams(corpus, tokenizer, train_ids, val_ids)


def check_batch_fits(tc: TrainConfig, n_train: int, n_validation: int) -> None:
    """A batch is bounded by the corpus, not by memory: a step's windows must not hold more
    tokens than the training split, nor the evaluation more windows than the validation split
    has distinct ones (any more would repeat windows, and only cost memory)."""
    most = n_train // tc.seq_len
    if tc.batch_size > most:
        raise NnobsError(
            f"train.batch_size={tc.batch_size} windows of seq_len={tc.seq_len} hold more tokens "
            f"than the training split of corpus {tc.corpus!r} ({n_train}): use a batch_size of "
            f"at most {most} or a larger corpus"
        )
    distinct = n_validation - tc.seq_len
    if tc.eval_batches * tc.batch_size > distinct:
        raise NnobsError(
            f"train.eval_batches={tc.eval_batches} × batch_size={tc.batch_size} validation "
            f"windows are more than the validation split of corpus {tc.corpus!r} has distinct "
            f"windows ({distinct}): lower eval_batches or use a larger corpus"
        )


def training_data(streams: TokenStreams, tc: TrainConfig, device: torch.device) -> TrainingData:
    """The training stream and the validation windows, moved to ``device``."""
    n_val = tc.eval_batches * tc.batch_size
    offsets = np.arange(tc.seq_len + 1)
    starts = eval_starts(len(streams.validation), tc.seq_len, n_val)
    val_windows = streams.validation[starts[:, None] + offsets]
    return TrainingData(
        train=torch.from_numpy(streams.train).to(device),
        val_windows=torch.from_numpy(val_windows).to(device=device, dtype=torch.long),
        n_train=len(streams.train),
    )


def unigram_loss(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats) on ``val_tokens`` of add-one smoothed training token frequencies."""
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts) - np.log(counts.sum())
    return float(-log_p[val_tokens].mean())
