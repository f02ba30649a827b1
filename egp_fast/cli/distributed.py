"""Where a process sits in a ``torchrun`` job, and the collective helpers the CLI's loops need.

:class:`DistInfo` describes this process (rank, world size, device); :func:`init_distributed`
joins the process group torchrun describes and :func:`cleanup_distributed` leaves it;
:func:`wrap_ddp` puts a model into DistributedDataParallel (:func:`egp_fast.graph.unwrap_model`
takes it out); :func:`broadcast_buffers` and :func:`all_reduce_sum` keep the ranks' buffers and
counts equal. Everything is a no-op for a one-process job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from egp_fast.errors import ConfigError

__all__ = [
    "DistInfo",
    "all_reduce_sum",
    "broadcast_buffers",
    "cleanup_distributed",
    "init_distributed",
    "wrap_ddp",
]


@dataclass
class DistInfo:
    """Where this process sits in a (possibly one-process) job.

    Attributes:
        rank: global rank (0 when not distributed).
        world_size: number of processes.
        local_rank: rank on this node (picks the GPU).
        device: the device this process computes on.
        distributed: whether ``torch.distributed`` was initialised by :func:`init_distributed`.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0: the only process that writes files and shows progress bars."""
        return self.rank == 0


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), if any.

    NCCL on CUDA, gloo on the CPU; rendezvous (one node or many) is torchrun's
    ``MASTER_ADDR``/``MASTER_PORT`` environment. Without those variables, or with
    ``WORLD_SIZE=1``, nothing is initialised.

    Args:
        device: ``auto`` (CUDA when visible), ``cpu`` or ``cuda``.

    Returns:
        A :class:`DistInfo`.

    Raises:
        ConfigError: unknown device or CUDA requested without a GPU.

    Example:
        >>> info = init_distributed("cpu")
        >>> info.world_size
        1
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = _pick_device(device, local)
    if world <= 1:
        return DistInfo(0, 1, 0, dev, False)
    import torch.distributed as dist

    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev, True)


def cleanup_distributed(info: DistInfo) -> None:
    """Leave the process group joined by :func:`init_distributed` (no-op otherwise).

    Args:
        info: what :func:`init_distributed` returned.

    Example:
        >>> cleanup_distributed(DistInfo())
    """
    if info.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """Wrap ``model`` in DistributedDataParallel when the job has several processes.

    Args:
        model: the model, already on ``info.device``.
        info: the job's :class:`DistInfo`.

    Returns:
        The DDP wrapper, or ``model`` itself for one process.

    Example:
        >>> m = nn.Linear(2, 2); wrap_ddp(m, DistInfo()) is m
        True
    """
    if not info.distributed:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def broadcast_buffers(model: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm running stats, masks) to every rank.

    DDP broadcasts buffers at the *start* of each forward, so after the last training step the
    ranks' running statistics differ; evaluation and entropy measurement must see one model.

    Args:
        model: the unwrapped module.
        info: the job's :class:`DistInfo`.

    Example:
        >>> broadcast_buffers(nn.BatchNorm1d(3), DistInfo())
    """
    if not info.distributed:
        return
    import torch.distributed as dist

    for b in model.buffers():
        dist.broadcast(b.data, src=0)


def all_reduce_sum(values: list[float], info: DistInfo | None) -> list[float]:
    """Sum a few numbers over the ranks (float64, so counts stay exact).

    Args:
        values: this rank's numbers (loss sums, correct predictions, samples).
        info: the job's :class:`DistInfo`; ``None`` or one process returns ``values`` as they are.

    Returns:
        The sums, one per value, the same on every rank.

    Example:
        >>> all_reduce_sum([1.0, 2.0], DistInfo())
        [1.0, 2.0]
    """
    if info is None or not info.distributed:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()
