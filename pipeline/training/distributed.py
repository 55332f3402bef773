"""Data parallel plumbing for the training engine: which rank this is, and the few collectives it needs.

Run under `torchrun --nproc_per_node N` (NCCL on GPU, Gloo on CPU). Every rank builds the
same global batches and takes its slice (pipeline/data/sequences.py), so the engine only
needs a sum across ranks (token counts, epoch totals), a broadcast of rank 0's early-stop
decision, and a barrier before the stage returns. With one process every call is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE_PROCESS = Dist()


def init_distributed(device: torch.device) -> Dist:
    """The process group torchrun describes in the environment, or a single process without one."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1:
        return SINGLE_PROCESS
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size())


def all_reduce_sum(value: float, device: torch.device, world: Dist) -> float:
    """`value` summed over ranks; with one process, `value` itself (an int stays an int)."""
    if world.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def broadcast_flag(flag: bool, device: torch.device, world: Dist) -> bool:
    """Rank 0's `flag` on every rank: only rank 0 validates, every rank must stop together."""
    if world.world_size == 1:
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def barrier(world: Dist) -> None:
    if world.world_size > 1:
        dist.barrier()
