"""Several processes, one per GPU: ``accelerate launch -m trainer …`` (or ``torchrun``).

The launcher sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; with a world of one nothing here does anything.  With more:

* each process joins the process group (NCCL on CUDA, XCCL on XPU, Gloo on a CPU) and uses
  the device of its local rank;
* the transformer is wrapped in DistributedDataParallel, so gradients are averaged across
  processes and every process applies the same update (stochastic rounding draws the same
  bits everywhere, so the copies stay identical);
* the sampler's sequence of batches is dealt out by rank: every process walks the same
  plan and trains on every ``world_size``-th batch, its own (so sampler positions agree
  and a checkpoint's sampler state serves all ranks);
* only rank 0 writes checkpoints, logs and progress; the others wait at a barrier.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

BACKENDS = {"cuda": "nccl", "xpu": "xccl", "cpu": "gloo"}


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> World:
        """As the launcher set it (a world of one when not launched)."""
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Whether this process writes checkpoints and logs."""
        return self.rank == 0

    def device_for(self, device: torch.device) -> torch.device:
        """The local rank's device of ``device``'s kind (the CPU stays the CPU)."""
        if not self.distributed or device.type == "cpu":
            return device
        return torch.device(device.type, self.local_rank)

    def join(self, device: torch.device) -> None:
        """Join the process group (once per process)."""
        if self.distributed and not dist.is_initialized():
            dist.init_process_group(BACKENDS.get(device.type, "gloo"))

    def wrap(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``module`` averaging its gradients across processes (itself in a world of one)."""
        if not self.distributed:
            return module
        device_ids = None if device.type == "cpu" else [device.index]
        return DistributedDataParallel(module, device_ids=device_ids)

    def deal(self, batches: Iterator[list[int]]) -> Iterator[list[int]]:
        """This rank's share of a batch sequence every rank walks in the same order."""
        if not self.distributed:
            yield from batches
            return
        # Whole rounds only, so every rank's sampler has handed out the same number of
        # batches: the position rank 0 saves is right for all of them on resume.
        while len(dealt := list(islice(batches, self.size))) == self.size:
            yield dealt[self.rank]

    def barrier(self) -> None:
        """Wait for every process (after rank 0 wrote a checkpoint)."""
        if self.distributed:
            dist.barrier()

    def leave(self) -> None:
        """Leave the process group."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
