"""Result documents: plain JSON with a versioned JSON Schema, written atomically.

Every nnobs command writes one document whose ``schema`` field names one of the result kinds
in ``SCHEMA_FILES`` (``nnobs.observe`` → ``schemas/observe.schema.json``). The field is looked
up in that table, never used as a file name, so a document cannot pick the schema it is
checked against. Documents are validated before they are written and when they are read, so a
report never renders a half-made, foreign or newer file.
"""

from __future__ import annotations

import json
import math
import platform
from datetime import UTC, datetime
from functools import cache
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np

from nnobs.core.errors import NnobsError
from nnobs.core.files import write_json
from nnobs.core.version import __version__

# The result kinds nnobs writes and the schema file of each, in nnobs/core/schemas/.
SCHEMA_FILES = {
    "nnobs.observe": "observe.schema.json",
    "nnobs.trajectory": "trajectory.schema.json",
    "nnobs.study": "study.schema.json",
    "nnobs.interventions": "interventions.schema.json",
    "nnobs.seeding": "seeding.schema.json",
    "nnobs.routing": "routing.schema.json",
    "nnobs.features": "features.schema.json",
    "nnobs.drift": "drift.schema.json",
    "nnobs.circuits": "circuits.schema.json",
    "nnobs.circuits_compare": "circuits_compare.schema.json",
    "nnobs.bridge": "bridge.schema.json",
    "nnobs.bridge_edit": "bridge_edit.schema.json",
    "nnobs.frontier": "frontier.schema.json",
}


def _shown(value: Any) -> str:
    """``repr(value)`` cut to a length that fits in a one-line error."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def software_provenance() -> dict[str, str]:
    """What computed a result, for its ``provenance``: nnobs and torch versions, host, time."""
    return {
        "nnobs_version": __version__,
        "torch_version": metadata.version("torch"),
        "host": platform.node(),
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _known_kind(name: Any) -> str:
    """``name`` if it is one of ``SCHEMA_FILES``; otherwise a one-line NnobsError."""
    if not isinstance(name, str) or name not in SCHEMA_FILES:
        raise NnobsError(
            f"not an nnobs result: unknown schema {_shown(name)} (not one of the "
            f"{len(SCHEMA_FILES)} kinds nnobs writes, such as nnobs.observe or nnobs.circuits)"
        )
    return name


def schema_for(name: str, version: int | None = None) -> dict:
    """The JSON Schema of a result kind, e.g. ``nnobs.observe``: the newest, or an older
    ``version`` this nnobs still reads (kept as ``<kind>.v<version>.schema.json``)."""
    filename = SCHEMA_FILES[_known_kind(name)]
    if version is not None:
        older = filename.replace(".schema.json", f".v{version}.schema.json")
        if resources.files("nnobs.core").joinpath("schemas", older).is_file():
            return _read_schema(older)
    return _read_schema(filename)


@cache
def _read_schema(filename: str) -> dict:
    return json.loads(resources.files("nnobs.core").joinpath("schemas", filename).read_text())


def schema_version(name: str) -> int:
    """The newest version of result kind ``name`` this nnobs reads and writes."""
    return schema_for(name)["properties"]["schema_version"]["const"]


def to_plain(obj: Any) -> Any:
    """numpy scalars/arrays → Python; non-finite floats → None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_plain(obj.tolist())
    if isinstance(obj, np.generic):
        return to_plain(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def validate(doc: dict, kind: str | None = None) -> None:
    """Check ``doc`` against its kind's schema (and, given ``kind``, that it is of that kind);
    any mismatch is a one-line NnobsError."""
    if not isinstance(doc, dict) or "schema" not in doc:
        raise NnobsError("not an nnobs result: it is not a JSON object with a 'schema' field")
    name = _known_kind(doc["schema"])
    if kind is not None and name != _known_kind(kind):
        raise NnobsError(f"it holds an {name} result, not the {kind} result expected here")
    version, newest = doc.get("schema_version"), schema_version(name)
    if isinstance(version, int) and not isinstance(version, bool) and version > newest:
        raise NnobsError(
            f"written by a newer nnobs ({name} schema {version}; this nnobs reads "
            f"{newest}): upgrade nnobs to read it"
        )
    older = version if isinstance(version, int) and not isinstance(version, bool) else None
    try:
        jsonschema.validate(doc, schema_for(name, older))
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise NnobsError(f"result does not match schema {name} at {where}: {err.message}") from None


def write_result(path: str | Path, doc: dict) -> Path:
    """Validate and write ``doc`` atomically; returns the path."""
    doc = to_plain(doc)
    validate(doc)
    write_json(path, doc)
    return Path(path)


def load_result(path: str | Path, kind: str | None = None) -> dict:
    """The validated result document at ``path`` (a file, or a directory holding one); given
    ``kind`` (e.g. ``nnobs.study``), a document of another kind is refused."""
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.json"))
        path = next((p for p in candidates if p.name.startswith(("observe", "result"))), path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise NnobsError(f"no result file at {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NnobsError(f"cannot read result {path}: {err}") from None
    try:
        validate(doc, kind)
    except NnobsError as err:
        raise NnobsError(f"{path}: {err}") from None
    return doc
