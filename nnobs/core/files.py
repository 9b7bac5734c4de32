"""Atomic file writes: a reader sees the old file or the complete new one, never half of it."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nnobs.core.errors import NnobsError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a result file is not
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, default: Callable | None = None) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=default) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and flush it to disk (metrics logs survive a kill)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; missing, unreadable or malformed → one-line NnobsError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise NnobsError(f"{what} {str(path)!r} is missing") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NnobsError(f"{what} {str(path)!r} is unreadable or corrupt ({e})") from e
    if not isinstance(data, dict):
        raise NnobsError(f"{what} {str(path)!r} is corrupt: expected a JSON object")
    return data


def check_output_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """``path`` as an output directory, refused in one line if it cannot be one: it is a file,
    lies under a file, or its nearest existing directory is not writable. Called before any
    work, so a bad ``--out`` is not found only when the result is written."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is under {str(existing)!r}, a file"
        raise NnobsError(f"{option} {str(path)!r} {where}: give a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise NnobsError(
            f"{option} {str(path)!r} is not writable ({str(existing)!r} is read-only for you): "
            "give a directory you can write to"
        )
    return path
