"""Run independent jobs (a study's training runs, a frontier's models) here or in worker
processes that die with the parent, collecting user errors so the other jobs finish."""

from __future__ import annotations

import concurrent.futures
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from nnobs.core.errors import NnobsError

Job = TypeVar("Job")

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _init_worker(threads: int, parent: int) -> None:
    _die_with_parent(parent)
    import torch

    torch.set_num_threads(threads)


def _die_with_parent(parent: int) -> None:
    """End this worker when the parent process ends, however it ends (SIGKILL included): an
    orphaned worker would keep training runs that a rerun trains again or finds locked."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) == 0:
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)
            return
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _watch_parent(parent: int) -> None:
    """Where the kernel cannot signal a parent's death: poll for it (orphans get a new PPID)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def run_jobs(
    jobs: Sequence[Job],
    run: Callable[[Job], Any],
    processes: int,
    done: Callable[[Job, Any, NnobsError | None], None],
) -> None:
    """Call ``run(job)`` for every job — in this process when ``processes`` is 1, else in that
    many spawned workers sharing the CPU cores' torch threads — and hand each outcome, or its
    :class:`NnobsError`, to ``done(job, outcome, error)`` as it finishes. Any other exception
    is raised. ``run`` must be importable (a module-level function) for the workers."""
    if processes == 1:
        for job in jobs:
            try:
                outcome = run(job)
            except NnobsError as e:
                done(job, None, e)
            else:
                done(job, outcome, None)
        return
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=processes,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(max(1, (os.cpu_count() or 1) // processes), os.getpid()),
    ) as pool:
        futures = {pool.submit(run, job): job for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            error = future.exception()
            if error is not None and not isinstance(error, NnobsError):
                raise error
            done(futures[future], None if error else future.result(), error)
