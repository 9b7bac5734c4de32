"""Training bridges, resumable exactly: a bridge directory and what it holds.

``DIR/config.json`` names the two models (path, step, weights fingerprint), the settings and
the bridges' shape; ``DIR/checkpoints/step_NNNNNN/`` holds the bridges and AdamW's state
(safetensors + JSON, assembled in a temporary directory and renamed into place, so a directory
named ``step_*`` is complete); ``DIR/metrics.jsonl`` the training log; ``DIR/bridges.safetensors``
the finished bridges. The batch of step s is drawn from the training split's token stream by a
generator seeded with (seed, s) alone, so a run killed and resumed from its last checkpoint
computes exactly what an uninterrupted one does. A directory made for other models or other
settings is refused, never overwritten; a finished one is left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from tqdm import tqdm

from nnobs.circuits.bridge_loss import bridge_objective, bridge_terms
from nnobs.circuits.bridge_model import WEIGHTS_FILE, Bridges, bridge_sites, check_pair
from nnobs.core.errors import NnobsError
from nnobs.core.fields import check_choice, check_int, check_number
from nnobs.core.files import append_jsonl, read_json, write_json
from nnobs.interventions.ablation import weights_fingerprint
from nnobs.models.adapter import ModelAdapter
from nnobs.models.checkpoint import load_safetensors
from nnobs.training.checkpoint import optimizer_state, restore_optimizer

BRIDGE_FORMAT = "nnobs-bridge/1"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
INITS = ("lstsq", "random")


@dataclass(frozen=True)
class BridgeSettings:
    """How bridges are trained. ``k``: entries AbsTopK keeps (0: a quarter of the sparse
    width); ``lm_coef``/``nmse_coef``/``kl_coef``: the objective's coefficients
    (:func:`~nnobs.circuits.bridge_loss.bridge_objective`); AdamW with ``lr`` and
    ``weight_decay``; ``steps`` of ``batch_size`` windows of ``seq_len`` tokens from the
    ``corpus``'s training split; a checkpoint every ``checkpoint_every`` steps. ``init``:
    ``"lstsq"`` starts every map at the least-squares linear map between the streams on
    ``init_windows`` windows (so short training refines the best linear bridge), ``"random"``
    at PyTorch's default initialisation."""

    k: int = 0
    init: str = "lstsq"
    init_windows: int = 32
    lm_coef: float = 1.0
    nmse_coef: float = 1.0
    kl_coef: float = 1.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    steps: int = 500
    batch_size: int = 8
    seq_len: int = 128
    corpus: str = "stdlib"
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10

    def __post_init__(self) -> None:
        check_int("k", self.k, 0)
        check_choice("init", self.init, INITS)
        check_int("init_windows", self.init_windows, 1)
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            check_int(name, getattr(self, name), 1)
        check_int("seq_len", self.seq_len, 2)
        check_int("seed", self.seed, 0)
        for name in ("lm_coef", "nmse_coef", "kl_coef", "weight_decay"):
            check_number(name, getattr(self, name), 0)
        check_number("lr", self.lr, 0, open_low=True)


def model_record(adapter: ModelAdapter) -> dict:
    """What a bridge directory records about one of its models."""
    prov = adapter.provenance
    return {
        "path": prov.get("path"),
        "step": prov.get("step"),
        "config_hash": prov.get("config_hash"),
        "weights": weights_fingerprint(adapter.model),
        "d_model": adapter.d_model,
        "n_layers": adapter.n_layers,
        "vocab_size": adapter.vocab_size,
    }


def bridge_config(dense: ModelAdapter, sparse: ModelAdapter, settings: BridgeSettings) -> dict:
    """The JSON that identifies a bridge directory: models, settings, shape."""
    k = settings.k or max(1, sparse.d_model // 4)
    return {
        "format": BRIDGE_FORMAT,
        "dense": model_record(dense),
        "sparse": model_record(sparse),
        "settings": asdict(settings),
        "shape": {
            "sites": bridge_sites(dense.n_layers),
            "d_dense": dense.d_model,
            "d_sparse": sparse.d_model,
            "k": k,
        },
    }


def read_config(directory: Path) -> dict:
    """A bridge directory's ``config.json``; refused in one line if it is not one."""
    config = read_json(directory / CONFIG_FILE, "bridge config")
    if config.get("format") != BRIDGE_FORMAT:
        raise NnobsError(f"{str(directory)!r} is not a bridge directory (no {BRIDGE_FORMAT})")
    return config


def check_same_models(directory: Path, config: dict, wanted: dict) -> None:
    """Refuse to reuse a bridge directory made for other models or other settings."""
    for role in ("dense", "sparse"):
        if config[role]["weights"] != wanted[role]["weights"]:
            raise NnobsError(
                f"bridge directory {str(directory)!r} was made from other models ({role} "
                f"{config[role]['path']}, weights {config[role]['weights']}; given "
                f"{wanted[role]['path']}, weights {wanted[role]['weights']}): use another --out"
            )
    changed = [
        f.name
        for f in fields(BridgeSettings)
        if config["settings"].get(f.name) != wanted["settings"][f.name]
    ]
    if changed:
        raise NnobsError(
            f"bridge directory {str(directory)!r} was trained with other settings "
            f"({', '.join(changed)}): use another --out, or the same settings to resume"
        )


def training_stream(tokenizer, corpus: str) -> np.ndarray:
    """The token stream of the corpus's training split (documents joined, as the models
    were trained)."""
    from nnobs.data.corpus import load_corpus
    from nnobs.data.encoding import token_stream

    return token_stream(load_corpus(corpus).train, tokenizer)


def step_batch(
    stream: np.ndarray, step: int, settings: BridgeSettings, n_windows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (batch, seq_len) of step ``step`` (step 0: the least-squares
    initialisation's ``n_windows``): windows at offsets drawn by a generator seeded with
    (seed, step) alone."""
    length = settings.seq_len
    if len(stream) < length + 2:
        raise NnobsError(f"the training stream has {len(stream)} tokens: fewer than one window")
    rng = np.random.default_rng([settings.seed, step])
    starts = rng.integers(0, len(stream) - length - 1, n_windows or settings.batch_size)
    windows = torch.from_numpy(stream[starts[:, None] + np.arange(length + 1)].astype(np.int64))
    return windows[:, :-1], windows[:, 1:]


def _checkpoints(directory: Path) -> list[Path]:
    root = directory / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.removeprefix("step_")))


def _save_checkpoint(directory: Path, step: int, bridges: Bridges, opt, parts: dict) -> None:
    root = directory / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        safetensors.torch.save_model(bridges, str(tmp / WEIGHTS_FILE))
        tensors, info = optimizer_state(opt)
        safetensors.torch.save_file(tensors, str(tmp / "optimizer.safetensors"))
        write_json(tmp / "optimizer.json", info)
        write_json(tmp / "state.json", {"step": step, **parts})  # last: marks completeness
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _resume(directory: Path, bridges: Bridges, opt) -> int:
    """Load the latest complete checkpoint into ``bridges`` and ``opt``; the step it was at
    (0 when there is none). The log keeps only the lines up to that step."""
    for tmp in (directory / "checkpoints").glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    done = _checkpoints(directory)
    step = 0
    if done:
        latest = done[-1]
        bridges.load_state_dict(load_safetensors(latest / WEIGHTS_FILE, "bridge checkpoint"))
        info = read_json(latest / "optimizer.json", "bridge optimizer state")
        tensors = load_safetensors(latest / "optimizer.safetensors", "bridge optimizer")
        restore_optimizer(opt, tensors, info)
        step = int(read_json(latest / "state.json", "bridge checkpoint state")["step"])
    log = directory / METRICS_FILE
    if log.is_file():
        kept = [ln for ln in log.read_text().splitlines() if json.loads(ln)["step"] <= step]
        write_json_lines(log, kept)
    return step


def write_json_lines(path: Path, lines: list[str]) -> None:
    """Replace ``path`` by ``lines`` (atomically)."""
    from nnobs.core.files import write_text

    write_text(path, "".join(line + "\n" for line in lines))


def new_bridges(config: dict, seed: int) -> Bridges:
    """Bridges of the config's shape, initialised from ``seed`` (torch's global generator
    untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        shape = config["shape"]
        return Bridges(shape["sites"], shape["d_dense"], shape["d_sparse"], shape["k"])


def train_bridges(
    dense: ModelAdapter,
    sparse: ModelAdapter,
    directory: str | Path,
    settings: BridgeSettings,
    progress: bool = True,
    stop_after: int | None = None,
    stream: np.ndarray | None = None,
) -> Bridges:
    """Train (or resume, or load if finished) the bridges of ``dense`` and ``sparse`` in
    ``directory``. ``stop_after``: stop once that step is saved (to test resuming);
    ``stream``: training tokens (default: the corpus's training split)."""
    directory = Path(directory)
    check_pair(dense, sparse, str(dense.provenance.get("path")), str(sparse.provenance.get("path")))
    config = bridge_config(dense, sparse, settings)
    if (directory / CONFIG_FILE).exists():
        check_same_models(directory, read_config(directory), config)
    if (directory / WEIGHTS_FILE).is_file():
        return Bridges.load(directory / WEIGHTS_FILE, config["shape"])
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / CONFIG_FILE, config)
    bridges = new_bridges(config, settings.seed).to(dense.device)
    opt = torch.optim.AdamW(
        bridges.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    start = _resume(directory, bridges, opt)
    if stream is None:
        stream = training_stream(dense.tokenizer, settings.corpus)
    if start == 0 and settings.init == "lstsq":
        ids, _ = step_batch(stream, 0, settings, settings.init_windows)
        acts = [a.run_with_cache(ids.to(a.device), bridges.sites)[1] for a in (dense, sparse)]
        bridges.fit_linear_(*acts)
    frozen = [(p, p.requires_grad) for a in (dense, sparse) for p in a.model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    bar = tqdm(
        total=settings.steps, initial=start, desc="bridge", unit="step", disable=not progress
    )
    try:
        for step in range(start + 1, settings.steps + 1):
            ids, targets = (t.to(dense.device) for t in step_batch(stream, step, settings))
            out = bridge_terms(bridges, dense, sparse, ids, targets)
            loss, parts = bridge_objective(
                out, settings.lm_coef, settings.nmse_coef, settings.kl_coef
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{parts['loss']:.3f}", nmse=f"{parts['nmse_enc']:.3f}")
            if step % settings.log_every == 0 or step == settings.steps:
                append_jsonl(directory / METRICS_FILE, {"step": step, **parts})
            if step % settings.checkpoint_every == 0 or step == settings.steps:
                _save_checkpoint(directory, step, bridges, opt, parts)
                if stop_after is not None and step >= stop_after:
                    return bridges
    finally:
        bar.close()
        for p, flag in frozen:
            p.requires_grad_(flag)
    bridges.save(directory / WEIGHTS_FILE)
    return bridges
