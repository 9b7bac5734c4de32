"""One writer per directory, and scratch space that outlives no process.

:func:`lock_directory` takes an exclusive ``flock`` on ``DIR/.lock`` for as long as a process
works in ``DIR``. The kernel drops the lock when the process ends, however it ends (SIGKILL
included), so a lock is never stale and never needs clearing by hand. The holder writes its
PID and command into the file, so a second process is refused at once with one line naming
the first. Locks are re-entrant within a process: a study worker holds its run directory
while the trainer it calls takes the same lock again.

:class:`ScratchDir` is a private working folder under a scratch root, named after its
process and locked by it; creating one removes the folders of processes that are gone.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from nnobs.core.errors import NnobsError

LOCK_FILE = ".lock"
_WRITABLE = "use a directory you can write to"


@dataclass
class _Held:
    fd: int
    created: list[Path]  # directories the first acquisition made, deepest first
    depth: int = 1


_held: dict[str, _Held] = {}  # by real path: the locks this process holds
_held_guard = threading.Lock()


@contextmanager
def lock_directory(
    path: str | os.PathLike, what: str = "directory", hint: str = "wait for it or use another --out"
) -> Iterator[Path]:
    """Hold the one-writer lock of directory ``path`` (created if missing) inside the block.

    Another process holding it → :class:`NnobsError` naming that process, ``what`` the kind of
    directory and ``hint`` what to do; nothing is written or deleted then. A directory left
    holding nothing but the lock file is removed again on release (with any parents this
    lock created), so a run refused for bad input leaves no trace.
    """
    directory = Path(path)
    with _held_guard:
        created = _make_directory(directory, what)
        key = os.path.realpath(directory)
        held = _held.get(key)
        if held is not None:
            held.depth += 1
        else:
            try:
                fd = _try_lock(directory, what, hint)
                while fd is None:  # lost a race with a holder removing the directory
                    created = _make_directory(directory, what)
                    fd = _try_lock(directory, what, hint)
            except BaseException:
                _remove_empty(created)
                raise
            held = _held[key] = _Held(fd, created)
    try:
        yield directory
    finally:
        with _held_guard:
            held.depth -= 1
            if not held.depth:
                del _held[key]
                _release(directory, held)


def _make_directory(directory: Path, what: str) -> list[Path]:
    """Create ``directory`` and its missing parents; return those it created, deepest first."""
    missing = [p for p in (directory, *directory.parents) if not p.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        where = "is a file" if directory.exists() else "lies under a file"
        raise NnobsError(f"{what} {str(directory)!r} {where}: give a directory") from None
    except OSError as e:
        raise NnobsError(
            f"cannot create {what} {str(directory)!r} ({e.strerror}): {_WRITABLE}"
        ) from e
    return missing


def _try_lock(directory: Path, what: str, hint: str) -> int | None:
    """The locked descriptor of ``directory``'s lock file, or None when the file was removed
    between opening and locking it (a holder releasing an otherwise empty directory)."""
    lock_path = directory / LOCK_FILE
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise NnobsError(
            f"cannot write to {what} {str(directory)!r} ({e.strerror}): {_WRITABLE}"
        ) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 1000, 0).decode("utf-8", "replace").strip() or "pid unknown"
        os.close(fd)
        raise NnobsError(
            f"{what} {str(directory)!r} is in use by another nnobs process ({holder}); {hint}"
        ) from None
    if not _is_current(fd, lock_path):  # locked a file nobody else will open
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}: {_command()}\n".encode(), 0)
    return fd


def _is_current(fd: int, path: Path) -> bool:
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _command() -> str:
    """This process's command line as the user typed it, on one line."""
    argv = list(sys.argv) or ["python"]
    if Path(argv[0]).name in ("nnobs", "__main__.py"):  # the script or ``python -m nnobs``
        argv[0] = "nnobs"
    return shlex.join(argv).replace("\n", " ")[:300]


def _release(directory: Path, held: _Held) -> None:
    try:
        if {p.name for p in directory.iterdir()} == {LOCK_FILE}:
            (directory / LOCK_FILE).unlink()  # still held: nobody can be using it
            _remove_empty(held.created)
    except OSError:
        pass  # the directory was moved or emptied meanwhile; the lock goes with the fd anyway
    finally:
        os.close(held.fd)


def _remove_empty(directories: list[Path]) -> None:
    for path in directories:
        try:
            path.rmdir()
        except OSError:
            return  # not empty: someone else put something there


# ------------------------------------------------------------------------ scratch space


@dataclass
class ScratchDir:
    """A working folder ``ROOT/<prefix><pid>-<random>`` for this process, locked while open.

    Creating one first removes the scratch folders under ``ROOT`` whose process is gone (a
    killed process cannot clean up after itself). Close it (or use it as a context manager)
    to delete it.
    """

    root: Path
    prefix: str
    path: Path = field(init=False)
    _fd: int | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        sweep_scratch(self.root)
        self.path = Path(tempfile.mkdtemp(prefix=f"{self.prefix}{os.getpid()}-", dir=self.root))
        self._fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def close(self) -> None:
        if self._fd is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        self.close()


def sweep_scratch(root: Path) -> None:
    """Delete the scratch folders under ``root`` whose owner process is gone.

    A folder is kept while the PID in its name is alive (it may be being created) or anyone
    holds its lock (a process in another PID namespace sharing the disk).
    """
    for entry in root.iterdir():
        pid = _owner_pid(entry.name)
        if pid is None or not entry.is_dir() or _pid_alive(pid):
            continue
        try:
            fd = os.open(entry / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            continue  # removed by another sweep, or not ours to touch
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(entry, ignore_errors=True)
        except BlockingIOError:
            pass
        finally:
            os.close(fd)


def _owner_pid(name: str) -> int | None:
    """The PID in a scratch folder's name ``<prefix><pid>-<random>``."""
    parts = name.rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True
