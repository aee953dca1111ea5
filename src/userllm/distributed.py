"""One process or many: the same training code runs alone or under ``torchrun --nproc_per_node=N``."""

from __future__ import annotations

import os

import torch.distributed as dist


def setup_distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, this process's device). Under torchrun (``WORLD_SIZE`` > 1) joins the process
    group: nccl on GPU (one GPU per process, by ``LOCAL_RANK``), gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return dist.get_rank(), dist.get_world_size(), device


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def leave_process_group() -> None:
    """Destroy the process group, if this process joined one, before it exits: a process that exits while
    still in a gloo group can abort in gloo's threads ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
