"""Multi-process training under ``torchrun``: process group, device, DDP wrapping, reductions.

``torchrun --nproc_per_node N -m compressor compress ...`` sets ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``; without them everything here is a no-op for a single process. NCCL on CUDA,
gloo on CPU. Only rank 0 writes files and prints (:attr:`Dist.is_main`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from .._device import resolve_device

__all__ = ["Dist", "init_distributed", "resolve_device"]


@dataclass
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we initialised the process group and destroy it at the end

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around ``model`` when distributed (gradients averaged over ranks), else ``model``."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids)

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Sum (or max) a few numbers over ranks. A sync point: call it per epoch or per log
        interval, not per step."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.tolist()

    def gather(self, obj):
        """Every rank's ``obj`` as a list (rank order); ``[obj]`` for one process."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (e.g. an error message, so all ranks stop together)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if not self.enabled:
            return
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: str | None = None) -> Dist:
    """Read torchrun's environment, pick the device and join the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world <= 1:
        return Dist(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
        owns = True
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=dev, owns_group=owns)
