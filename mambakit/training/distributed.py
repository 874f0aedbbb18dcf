"""Multi-process training through torch's own engine: under `torchrun`, one process per device,
DistributedDataParallel averages the gradients. Each rank takes its rows of the global batch,
so a run on N ranks sees exactly the batches of a single-process run."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(device_type: str) -> DistEnv:
    """Joins the process group that torchrun set up (WORLD_SIZE > 1); otherwise a single rank.
    NCCL on CUDA (NVLink multicast left off, as the device README asks), gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    env = DistEnv(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device_type == "cuda":
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return env


def rows_of(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """This rank's rows of a global batch (B, ...): rows rank, rank + world, ..."""
    return x[env.rank::env.world] if env.active else x


def mean_over_ranks(value: float, env: DistEnv, device) -> float:
    if not env.active:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / env.world


def any_rank(flag: bool, env: DistEnv, device) -> bool:
    """True on every rank when it is true on any (a signal seen by one rank stops all at the
    same step)."""
    if not env.active:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(env: DistEnv) -> None:
    if env.active:
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    if env.active and dist.is_initialized():
        dist.destroy_process_group()
