"""Fixtures shared by the observability-over-training tests: a small Python corpus on disk
and a tiny run trained on it, both built once per session in seconds."""

import re
import sysconfig
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from nnobs.models.config import ModelConfig
from nnobs.training.config import TrainConfig

TINY_MODEL = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)


def tiny_train_config(corpus: Path, **changes) -> TrainConfig:
    """24 steps, checkpoints at 0, 8, 16 and 24."""
    base = TrainConfig(
        corpus=str(corpus), tokenizer="byte", seq_len=64, batch_size=8, steps=24, lr=1e-2,
        warmup_steps=4, eval_every=8, eval_batches=2, log_every=4, first_checkpoint=8,
        checkpoint_every=16, device="cpu",
    )  # fmt: skip
    return base.replace(**changes)


@contextmanager
def torch_threads(n: int):
    """Torch on ``n`` threads inside the block, the previous setting restored after it. Tiny
    tensors run far faster on one thread than on two on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def nnobs_cache(tmp_path_factory):
    """Token and tokenizer caches in a temporary directory for the whole session."""
    cache = tmp_path_factory.mktemp("nnobs-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("NNOBS_CACHE", str(cache))
    yield cache
    mp.undo()


@pytest.fixture(scope="session")
def python_corpus(tmp_path_factory) -> Path:
    """300 short real Python files (the first 40 lines of stdlib modules): enough documents
    that each probe split spans many of them."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if not {"test", "tests", "site-packages"} & set(p.parts)
    )[:300]
    out = tmp_path_factory.mktemp("python-corpus")
    for i, path in enumerate(files):
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()[:40]
        (out / f"m{i:03d}.py").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def python_run(nnobs_cache, python_corpus, tmp_path_factory) -> Path:
    """A 2-layer, 32-wide byte-level model trained for 24 steps on ``python_corpus``."""
    from nnobs.training.trainer import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    with torch_threads(1):
        train(TINY_MODEL, tiny_train_config(python_corpus), out, progress=False)
    return out


def tiny_gpt2_adapter():
    """A 2-layer, 32-wide GPT-2 with random weights and byte tokens, wrapped by the HF adapter."""
    import torch
    import transformers

    from nnobs.data.tokenizer import byte_tokenizer
    from nnobs.models.hf import hf_adapter

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=300, n_positions=64,
        bos_token_id=256, eos_token_id=256,
    )  # fmt: skip
    return hf_adapter(transformers.GPT2LMHeadModel(cfg).eval(), byte_tokenizer())


# ------------------------------------------------------------------------ refusals

# stderr lines that are not messages: nnobs's "· " progress log and tqdm's bars ("40%|###")
NOT_A_MESSAGE = re.compile(r"^· |\d+%\||\d+(\.\d+)?(it/s|s/it)\]")


def train_one_and_two_processes(tmp_path: Path, args: list[str]):
    """Train ``nnobs <args>`` in one process (``tmp_path/one``) and in two gloo processes under
    torchrun (``tmp_path/two``); returns both run directories and torchrun's completed process."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NNOBS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "nnobs", *args, "--out", str(one)], env=env, check=True)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "nnobs.cli", *args, "--out", str(two)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return one, two, done


def file_snapshot(dirs: Sequence[Path]) -> dict[Path, tuple[int, int]]:
    """Size and modification time of every file under ``dirs`` (missing dirs hold none)."""
    return {
        path: (path.stat().st_size, path.stat().st_mtime_ns)
        for root in map(Path, dirs)
        for path in (root.rglob("*") if root.is_dir() else [root] if root.is_file() else [])
        if path.is_file()
    }


def message_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` a user reads as messages: progress output left out."""
    lines = (line.strip() for line in re.split(r"[\r\n]", stderr))
    return [line for line in lines if line and not NOT_A_MESSAGE.search(line)]


@pytest.fixture
def expect_refusal(capfd, nnobs_cache) -> Callable[..., str]:
    """``expect_refusal(argv, message, watch=[dirs])`` runs ``nnobs argv`` in this process and
    asserts a refusal: exit status 2, exactly one message line on stderr, starting with
    ``error: `` and containing ``message``, no traceback anywhere, and no file under ``watch``
    created, changed or removed. Returns the error line.

    An exception escaping the command fails the test with its traceback.
    """
    from nnobs.cli import main

    def check(argv: Sequence[str], message: str, watch: Sequence[Path] = ()) -> str:
        before = file_snapshot(watch)
        capfd.readouterr()
        status = main([str(a) for a in argv])
        out, err = capfd.readouterr()
        lines = message_lines(err)
        shown = f"argv: {list(argv)}\nstderr:\n{err}"
        assert "Traceback" not in out + err, shown
        assert status == 2, f"exit status {status}\n{shown}"
        assert len(lines) == 1 and lines[0].startswith("error: "), shown
        assert message in lines[0], shown
        after = file_snapshot(watch)
        changed = sorted(
            str(p) for p in before.keys() | after.keys() if before.get(p) != after.get(p)
        )
        assert not changed, f"files created, changed or removed: {changed}\n{shown}"
        return lines[0]

    return check
