"""Data parallelism under torchrun: the process group, each rank's share of a batch, and reductions.

`torchrun --nproc-per-node N -m hello_fast distill ...` starts N processes; each trains on its
contiguous share of every global batch (the global batch size is the config's), gradients are
averaged by DistributedDataParallel, metrics are summed over ranks, and rank 0 alone writes files.
Augmentation streams are the same on every rank (they are drawn from seeds, not from the rank).
NCCL on GPUs (BatchNorm synchronised), gloo on CPUs (per-rank BatchNorm: SyncBatchNorm needs a GPU).
A plain `python -m hello_fast` is world size 1 and none of this costs anything.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from hello_fast.errors import HelloError


def resolve_device(name: str) -> torch.device:
    """A device name (auto, cpu, cuda) as the device a single-process run computes on."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise HelloError("--device cuda was asked for but no CUDA device is available")
    return torch.device(name)


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


_world = World()


def setup(device_name: str) -> tuple[World, torch.device]:
    """Join torchrun's process group if launched by it; returns (world, this rank's device)."""
    global _world
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        _world = World()
        return _world, resolve_device(device_name)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise HelloError("--device cuda was asked for but no CUDA device is available")
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30),
                                **({"device_id": device} if use_cuda else {}))
    _world = World(rank, size, local)
    return _world, device


def world() -> World:
    return _world


def barrier() -> None:
    if _world.distributed:
        dist.barrier()


def sum_over_ranks(values: list[float], device) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64)."""
    if not _world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def share(n: int, rank: int | None = None, size: int | None = None) -> slice:
    """This rank's contiguous share of n rows (shares differ by at most one row)."""
    rank = _world.rank if rank is None else rank
    size = _world.size if size is None else size
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def loss_weight(local_rows: int, device) -> float:
    """Factor for a rank's mean loss so that DDP's gradient average equals the global batch's mean.

    DDP averages gradients over ranks; with unequal shares (a last, short batch) the mean of the
    ranks' means is not the batch mean: weighting by rows * ranks / global rows makes it so.
    """
    if not _world.distributed:
        return 1.0
    total = sum_over_ranks([local_rows], device)[0]
    return local_rows * _world.size / max(total, 1.0)


def share_sizes(n: int) -> list[int]:
    return [share(n, r).stop - share(n, r).start for r in range(_world.size)]


def data_parallel(model: torch.nn.Module, device, *, frozen_backbone: bool = False) -> torch.nn.Module:
    """DistributedDataParallel when there are several ranks; else the model itself.

    Training BatchNorm is synchronised on GPUs; `frozen_backbone` (the projector: BatchNorm in eval
    mode, only adapters train) keeps it as it is and skips broadcasting buffers.
    """
    if not _world.distributed:
        return model

    kwargs = {"broadcast_buffers": not frozen_backbone}
    if device.type == "cuda":
        if not frozen_backbone:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[device.index], **kwargs)
    return DistributedDataParallel(model, **kwargs)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model
