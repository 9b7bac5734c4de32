"""Result documents: plain JSON with a versioned JSON Schema, written atomically.

Every nnobs command writes one document whose ``schema`` field names a file in
``nnobs/core/schemas/`` (``nnobs.observe`` → ``observe.schema.json``). Documents are validated
before they are written and when they are read, so a report never renders a half-made or
foreign file.
"""

from __future__ import annotations

import json
import math
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np

from nnobs.core.errors import NnobsError
from nnobs.core.files import write_json


@cache
def schema_for(name: str) -> dict:
    """The JSON Schema of a result kind, e.g. ``nnobs.observe``."""
    filename = name.removeprefix("nnobs.") + ".schema.json"
    try:
        text = resources.files("nnobs.core").joinpath("schemas", filename).read_text()
    except FileNotFoundError:
        raise NnobsError(f"unknown result schema {name!r}") from None
    return json.loads(text)


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


def validate(doc: dict) -> None:
    name = doc.get("schema") if isinstance(doc, dict) else None
    if not isinstance(name, str):
        raise NnobsError("not an nnobs result: it has no 'schema' field")
    try:
        jsonschema.validate(doc, schema_for(name))
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise NnobsError(f"result does not match schema {name} at {where}: {err.message}") from None


def write_result(path: str | Path, doc: dict) -> Path:
    """Validate and write ``doc`` atomically; returns the path."""
    doc = to_plain(doc)
    validate(doc)
    write_json(path, doc)
    return Path(path)


def load_result(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.json"))
        path = next((p for p in candidates if p.name.startswith(("observe", "result"))), path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise NnobsError(f"no result file at {path}") from None
    except (OSError, json.JSONDecodeError) as err:
        raise NnobsError(f"cannot read result {path}: {err}") from None
    validate(doc)
    return doc
