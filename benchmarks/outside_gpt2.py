"""A GPT-2-architecture model trained with plain ``transformers`` and ``torch``, not by nnobs.

Benchmark code, not part of the package: ``bench_reference_gap.py`` observes a model that nnobs
did not train, as a new user would bring one. The tokenizer is a byte-level BPE trained with
the ``tokenizers`` library on the corpus's training split, wrapped as a GPT-2 tokenizer (no
BOS added); the model is a ``GPT2LMHeadModel`` trained with AdamW on random windows of the
training split's documents joined by end-of-text, for a fixed number of steps (on CPU with
one thread the model is the same on every run of a seed). Both are
written with ``save_pretrained``, so ``nnobs observe --model DIR`` loads them as any Hugging
Face checkpoint.

    .venv/bin/python benchmarks/outside_gpt2.py --out runs/outside-gpt2 [--steps 400]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nnobs.data.corpus import load_corpus

EOS = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS
    )


def train(out: Path, steps: int, seq_len: int, batch_size: int, seed: int) -> None:
    torch.manual_seed(seed)
    texts = [d.text for d in load_corpus("stdlib").train]
    tokenizer = train_tokenizer(texts, 4096)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream = np.concatenate([np.array(d + [tokenizer.eos_token_id], dtype=np.int64) for d in ids])
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=512,
        n_embd=128,
        n_layer=4,
        n_head=4,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = transformers.GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    for step in range(steps):
        lr_scale = min(1.0, (step + 1) / 100)  # warm up, then constant
        for group in opt.param_groups:
            group["lr"] = 1e-3 * lr_scale
        starts = rng.integers(0, len(stream) - seq_len, batch_size)
        batch = torch.from_numpy(np.stack([stream[s : s + seq_len] for s in starts]))
        loss = model(batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f} ({loss.item() / math.log(2):.2f} bits)")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"saved {out} after {steps} steps, last loss {loss.item():.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/outside-gpt2"))
    parser.add_argument("--steps", type=int, default=400, help="optimiser steps")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train(args.out, args.steps, args.seq_len, args.batch_size, args.seed)


if __name__ == "__main__":
    main()
