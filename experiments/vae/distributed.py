"""Data parallel runs: the :class:`Distributed` helper (rank, world size, collectives).

Launched by ``torchrun`` (``WORLD_SIZE`` > 1), every rank takes a slice of each global batch,
gradients are averaged by ``DistributedDataParallel`` (gloo on CPU, NCCL on CUDA) and rank 0
writes the files; one process (no ``WORLD_SIZE``) needs no ``torch.distributed`` at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Distributed"]


@dataclass
class Distributed:
    """Rank, world size and local rank; ``torch.distributed`` is set up when ``world > 1``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls, device_type: str) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        if world > 1:
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
        return cls()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered

    def mean(self, value: Tensor) -> Tensor:
        if self.world > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world
        return value

    def identical(self, state: dict[str, Tensor]) -> bool:
        """Whether every rank holds a bit-identical ``state`` (a state dict; True for one process)."""
        if self.world == 1:
            return True
        flat = torch.cat([t.detach().double().flatten() for t in state.values()])
        gathered = [torch.empty_like(flat) for _ in range(self.world)]
        dist.all_gather(gathered, flat)
        return all(torch.equal(gathered[0], other) for other in gathered[1:])

    def close(self) -> None:
        """Wait for every rank, then leave the process group (nothing for one process)."""
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
