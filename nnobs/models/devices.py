"""The torch device a user names, checked against this machine before any work is done."""

from __future__ import annotations

import torch

from nnobs.core.errors import NnobsError


def available_devices() -> list[str]:
    """The devices nnobs can run on here: the CPU, each CUDA GPU, Apple's MPS."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def check_device(name: str | torch.device, what: str = "device") -> torch.device:
    """The device ``name`` names (``cpu``, ``cuda``, ``cuda:N`` or ``mps``) once this machine
    has it; anything else is one NnobsError that lists the devices there are. ``what`` names
    the setting in the message (e.g. ``--device``)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):  # not a device torch knows: "tpu", "gpu"
        device = None
    here = available_devices()
    if device is not None and (
        device.type == "cpu"
        or (device.type == "mps" and "mps" in here)
        or (
            device.type == "cuda"
            and torch.cuda.is_available()
            and (device.index or 0) < torch.cuda.device_count()
        )
    ):
        return device
    raise NnobsError(f"{what} {str(name)!r} is not a device of this machine: use {', '.join(here)}")
