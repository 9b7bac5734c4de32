"""Settings dataclasses from stored dicts, and the checks their fields share: an unknown name,
a value of the wrong type or out of range is refused in one line naming the setting."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
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


def is_int(value: Any) -> bool:
    """An integer and not a bool (``True`` is an int to Python, never a size to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float, and not a bool."""
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    """``value`` is an integer in ``[low, high]``; else one NnobsError naming ``name``."""
    if is_int(value) and low <= value and (high is None or value <= high):
        return
    allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
    note = (
        " (a float: write integers without a decimal point or exponent)"
        if isinstance(value, float) and value.is_integer()
        else ""
    )
    raise NnobsError(f"{name} must be an integer {allowed}, got {value!r}{note}")


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    open_low: bool = False,
    open_high: bool = False,
) -> None:
    """``value`` is a finite int or float within the bounds given (closed unless ``open_*``);
    else one NnobsError naming ``name`` and what is allowed."""
    if not is_number(value):
        raise NnobsError(f"{name} must be a finite number, got {value!r}")
    below = low is not None and (value <= low if open_low else value < low)
    above = high is not None and (value >= high if open_high else value > high)
    if below or above:
        if high is None:
            allowed = f"{'>' if open_low else '>='} {low}"
        elif low is None:
            allowed = f"{'<' if open_high else '<='} {high}"
        else:
            allowed = f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise NnobsError(f"{name} must be a number {allowed}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """``value`` is a bool (a string such as "no" is truthy, so it is refused, not guessed)."""
    if not isinstance(value, bool):
        raise NnobsError(f"{name} must be true or false, got {value!r}")


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    """``value`` is one of ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        raise NnobsError(f"unknown {name} {value!r}: choose one of {', '.join(allowed)}")
