"""Process groups under torchrun, driven by its environment variables. A plain ``python train_x.py``
is a world of one and touches nothing here."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1


def init_distributed(use_cuda: bool) -> DistEnv:
    """Join the process group that torchrun describes (NCCL on GPUs, gloo on CPU). Each process's GPU is the
    one ``select_device`` set (LOCAL_RANK)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistEnv(int(os.environ.get("RANK", "0")), world_size)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op in a world of one)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is True on any rank (every rank must call it; a host sync)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    return all_reduce_sum(t).item() > 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BN running statistics), so all ranks evaluate and save one model.
    DDP itself does this only at the start of the next training forward."""
    if dist.is_available() and dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)
