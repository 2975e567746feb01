"""torchrun support: one process per device; gloo on CPU, nccl on CUDA."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init() -> tuple[int, int, torch.device | None]:
    """(rank, world_size, device or None) from the torchrun environment; a no-op without one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        from fpo_kernels import pin_autotune

        pin_autotune()  # every rank runs the same tiles: bitwise-equal features, equal top-k choices
    if dist.is_initialized():
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        return dist.get_rank(), dist.get_world_size(), dev
    return 0, 1, None


def barrier():
    if dist.is_initialized():
        dist.barrier()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def local_shard(p: torch.Tensor) -> torch.Tensor:
    """A parameter's local part: this rank's shard of an FSDP (DTensor) parameter, else the parameter."""
    return p.to_local() if hasattr(p, "to_local") else p
