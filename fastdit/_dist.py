"""torchrun process groups: one process per device; a plain `python` run is a world of one."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._util import UsageError


def is_dtensor(t):
    """Whether t is a DTensor (a parameter, gradient or state FSDP shards over the ranks)."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_shards(tensors):
    """The tensors, each DTensor (FSDP's) replaced by this rank's shard of it: for elementwise updates and checks.
    A training step calls it on every parameter: hasattr costs 0.05 us a tensor, is_dtensor's import 0.7 us."""
    return [t.to_local() if hasattr(t, "to_local") else t for t in tensors]


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # this code created the process group, so it destroys it

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def active(self):
        return dist.is_available() and dist.is_initialized()

    def barrier(self):
        if self.active:
            dist.barrier()

    def all_reduce_sum(self, tensor):
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, obj):
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self):
        if self.owns_group and self.active:
            dist.destroy_process_group()


def env_world_size():
    """WORLD_SIZE set by torchrun (1 without it): known before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def pick_device(device, local_rank):
    """'auto' -> cuda:LOCAL_RANK when CUDA exists, else cpu."""
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for, but this torch has no CUDA device")
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device="auto"):
    """Join torchrun's process group (nccl on CUDA, gloo on CPU) when WORLD_SIZE > 1; LOCAL_RANK picks the GPU."""
    world = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return Dist(rank, world, local_rank, dev, owns)
