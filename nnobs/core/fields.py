"""Settings dataclasses from stored dicts: an unknown name is refused in one line."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from nnobs.core.errors import NnobsError

T = TypeVar("T")


def from_fields(cls: type[T], data: dict[str, Any], what: str) -> T:
    """``cls(**data)`` for a dataclass, refusing names it does not have.

    ``what`` names the settings in the message, e.g. "model knob" or "train setting".
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise NnobsError(
            f"unknown {what}(s) {', '.join(unknown)}: known {what}s are {', '.join(sorted(known))}"
        )
    return cls(**data)
