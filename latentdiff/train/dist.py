"""Distributed: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without them this is a single process."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    host_group: object = None  # a gloo group for the per-step stop flag, whatever the device's backend

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed() -> Dist:
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        # The rendezvous (MASTER_ADDR/PORT or torchrun's c10d store) comes from the environment, so one node and
        # many nodes run the same code.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                **({"device_id": device} if device.type == "cuda" else {}))
    host_group = dist.new_group(backend="gloo") if world_size > 1 else None
    return Dist(rank, local_rank, world_size, device, host_group)


def any_rank(flag: bool, d: Dist) -> bool:
    """Whether flag is set on any rank. A CPU all-reduce over gloo: the ranks' hosts meet, but nothing waits for the
    device's queue (an NCCL all-reduce would have to be read back, a device sync every step)."""
    if not d.enabled:
        return flag
    x = torch.tensor([float(flag)])
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=d.host_group)
    return x.item() > 0


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_gather(obj, d: Dist) -> list:
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj, d: Dist):
    """Rank 0's value of a small picklable object, on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist):
    if d.enabled:
        dist.barrier()
