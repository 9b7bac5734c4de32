"""One writer per directory, and no process outliving the study that started it: real
processes raced on one run or study directory, and killed with SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from nnobs.cli import main
from nnobs.core.errors import NnobsError
from nnobs.core.lock import lock_directory
from nnobs.core.rundir import list_checkpoints, read_metrics
from nnobs.observe.study import Unit, run_study, run_unit
from nnobs.observe.study_config import parse_study, study_run_dir, variant_configs

# The tiny preset on a small corpus slice; checkpoints at 0, 4, 8.
FAST = ["--preset", "tiny", "--no-progress", "--set", "train.max_chars=30000",
        "--set", "train.first_checkpoint=4"]  # fmt: skip
SHORT = [*FAST, "--set", "train.steps=8"]
ENDLESS = [*FAST, "--set", "train.steps=100000"]  # still training when it is raced or killed


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("NNOBS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def start_nnobs(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nnobs", *args], stderr=subprocess.PIPE)


def wait_until(condition, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"nnobs ended early: {process.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for the nnobs process")
        time.sleep(0.05)


def refused(capsys, argv: list[str]) -> str:
    """Runs ``nnobs argv``; asserts exit 2 with one error line, and returns it."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@contextmanager
def held_by_another_process(directory: Path):
    """``directory``'s lock, held by a process that is not this one."""
    code = (
        "import sys\nfrom nnobs.core.lock import lock_directory\n"
        "with lock_directory(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.communicate("")


# ------------------------------------------------------------------- two trainers, one run


@pytest.mark.slow
def test_a_second_trainer_is_refused_while_the_first_runs(tmp_path, capsys):
    out = tmp_path / "run"
    first = start_nnobs("train", *ENDLESS, "--out", str(out))
    try:
        wait_until(lambda: list_checkpoints(out), first)
        run_json = (out / "run.json").read_bytes()
        relu = ["--set", "model.activation='relu'", "--set", "train.steps=200"]
        for extra in ([], relu, ["--overwrite"], [*relu, "--overwrite"]):
            err = refused(capsys, ["train", *ENDLESS, *extra, "--out", str(out)])
            assert err == (
                f"error: run directory {str(out)!r} is in use by another nnobs process "
                f"(pid {first.pid}: nnobs train {' '.join(ENDLESS)} --out {out}); "
                "wait for it or use another --out"
            )
            # Nothing of the first run was touched: not its description, not its checkpoints.
            assert (out / "run.json").read_bytes() == run_json
            assert list_checkpoints(out)[0][0] == 0
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()
    # The kernel dropped the killed run's lock: one after the other, both are fine.
    assert main(["train", *SHORT, "--overwrite", "--out", str(out)]) == 0
    assert main(["train", *SHORT, "--out", str(out)]) == 0
    assert [r["step"] for r in read_metrics(out)] == [0, 4, 8]


def test_a_lock_is_reentrant_in_its_process_and_leaves_no_trace(tmp_path):
    run = tmp_path / "runs" / "a"
    with lock_directory(run, "run directory"), lock_directory(run, "run directory"):
        assert (run / ".lock").read_text().startswith(f"pid {os.getpid()}: ")
    assert not (tmp_path / "runs").exists()  # it held nothing but the lock
    with lock_directory(run, "run directory"):
        (run / "run.json").write_text("{}")
    assert sorted(p.name for p in run.iterdir()) == [".lock", "run.json"]


def test_a_run_held_elsewhere_is_not_touched_even_with_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints" / "step_000000").mkdir(parents=True)
    (out / "checkpoints" / "step_000000" / "meta.json").write_text("{}")
    (out / "run.json").write_text('{"format": "nnobs-run/1"}')
    before = sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*") if p.name != ".lock")
    with held_by_another_process(out) as pid:
        for extra in ([], ["--overwrite"]):
            err = refused(capsys, ["train", *SHORT, *extra, "--out", str(out)])
            assert f"is in use by another nnobs process (pid {pid}: " in err
    assert sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*") if p.name != ".lock") == before


def test_a_directory_held_elsewhere_refuses_a_study_and_its_runs(tmp_path):
    study = tmp_path / "study"
    cfg = parse_study(tiny_study(tmp_path / "corpus", steps=8))
    with held_by_another_process(study) as pid, pytest.raises(NnobsError) as refusal:
        run_study(cfg, study)
    assert f"study directory {str(study)!r} is in use by another nnobs process (pid {pid}: " in (
        str(refusal.value)
    )
    assert not study.exists()
    # A run directory held by a straggler (a worker of a killed study, say) is not trained
    # over: its unit fails and says why.
    run_dir = study_run_dir(study, "pre", 0)
    unit = Unit("pre", 0, run_dir, variant_configs(cfg)["pre"], cfg.train, cfg.observe)
    with held_by_another_process(run_dir) as pid, pytest.raises(NnobsError) as refusal:
        run_unit(unit)
    message = str(refusal.value)
    assert f"run directory {str(run_dir)!r} is in use by another nnobs process (pid {pid}: " in (
        message
    )
    assert message.endswith("wait for it or stop it, then re-run the study")
    assert not run_dir.exists()


# ----------------------------------------------------------------- a study killed mid-run


def tiny_study(corpus: Path, steps: int) -> dict:
    corpus.mkdir(exist_ok=True)
    for i in range(40):  # enough Python for two runs to train on
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 20)
    return {
        "study": {"name": "tiny", "baseline": "pre", "seeds": [0, 1]},
        "model": {"vocab_size": 257, "d_model": 32, "n_layers": 2, "n_heads": 4,
                  "max_seq_len": 32},
        "train": {"corpus": str(corpus), "tokenizer": "byte", "seq_len": 32, "batch_size": 4,
                  "steps": steps, "lr": 1e-2, "warmup_steps": 2, "eval_every": 1000,
                  "eval_batches": 1, "first_checkpoint": 4, "checkpoint_every": 1000},
        "observe": {"ex_per_dim": 10, "doc_tokens": 64, "seeds": [43, 44], "n_boot": 50},
        "variants": [{"name": "pre"}, {"name": "post", "model": {"norm_placement": "post"}}],
    }  # fmt: skip


def toml(doc: dict) -> str:
    def value(v):
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v) if isinstance(v, str) else str(v)

    lines = []
    for section, table in doc.items():
        for row in table if isinstance(table, list) else [table]:
            lines.append(f"[[{section}]]" if isinstance(table, list) else f"[{section}]")
            lines += [f"{k} = {value(v)}" for k, v in row.items()]
    return "\n".join(lines) + "\n"


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a zombie has ended: only its exit status waits to be read)."""
    running = []
    for p in processes:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                running.append(p)
        except psutil.NoSuchProcess:
            pass
    return running


@pytest.mark.slow
def test_a_study_killed_with_sigkill_leaves_no_worker_alive(tmp_path):
    config = tmp_path / "study.toml"
    config.write_text(toml(tiny_study(tmp_path / "corpus", steps=1_000_000)))
    out = tmp_path / "study"
    study = start_nnobs("study", "--config", str(config), "--out", str(out), "--jobs", "2")
    runs = [out / "runs" / v / f"seed_{s}" for v in ("pre", "post") for s in (0, 1)]
    try:
        # Both workers are training once two runs have logged their first step.
        wait_until(lambda: sum(read_metrics(r) != [] for r in runs) >= 2, study)
        children = psutil.Process(study.pid).children(recursive=True)
        assert len(alive(children)) >= 2
    finally:
        study.send_signal(signal.SIGKILL)
        study.wait()
    deadline = time.monotonic() + 5.0
    while alive(children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(children), [p.cmdline() for p in alive(children)]
    # Nothing holds the study or its runs any more: a rerun takes them over at once.
    for directory in [out, *runs]:
        with lock_directory(directory):
            pass
