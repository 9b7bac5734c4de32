"""Data-parallel training: the process group torchrun describes, and the device of each rank.

Under DDP each rank takes its contiguous slice of the same global batch, so the data is
identical to a single process; a run with one process never touches ``torch.distributed``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nnobs.core.errors import NnobsError
from nnobs.models.devices import check_device


@dataclass
class Distributed:
    """This process's place in the group: rank, world size, local rank on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this process created the group, so it destroys it

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def slice(self, batch_size: int) -> tuple[int, int]:
        """This rank's rows ``[lo, hi)`` of a global batch."""
        per_rank = batch_size // self.world
        return self.rank * per_rank, (self.rank + 1) * per_rank

    def sum(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the ranks, in place."""
        if self.world > 1:
            dist.all_reduce(tensor)

    def mean(self, tensor: torch.Tensor) -> None:
        """Average ``tensor`` over the ranks, in place."""
        if self.world > 1:
            dist.all_reduce(tensor)
            tensor /= self.world

    def place(self, device: torch.device, batch_size: int) -> torch.device:
        """This rank's device (its own GPU under CUDA), once the batch splits evenly."""
        if self.world == 1:
            return device
        if batch_size % self.world:
            raise NnobsError(
                f"train.batch_size={batch_size} does not split evenly over {self.world} "
                "processes: use a multiple of the process count"
            )
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """``module`` under DistributedDataParallel when there are several ranks."""
        if self.world == 1:
            return module
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


def init_distributed(device_kind: str) -> Distributed:
    """Join the process group torchrun describes in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Distributed(rank, world, local, owns)


def pick_device(name: str) -> torch.device:
    """The training device ``train.device`` names (``auto``: CUDA when there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(name, "train.device")
