"""Training pieces behind ``egp-fast``: loops, optimizer/schedule, AMP, DDP helpers, checkpoints.

Everything here is independent of the pruning core: the CLI composes these with
:class:`egp_fast.Pruner`. Checkpoints are written atomically (temporary file, fsync,
``os.replace``) and read with ``torch.load(..., weights_only=True)``; a truncated or foreign
file raises :class:`~egp_fast.errors.CheckpointError`.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from egp_fast._progress import progress_bar
from egp_fast.errors import CheckpointError, ConfigError

__all__ = [
    "CHECKPOINT_FORMAT",
    "DistInfo",
    "atomic_write_bytes",
    "atomic_write_text",
    "autocast",
    "broadcast_buffers",
    "build_optimizer",
    "build_scheduler",
    "capture_rng_state",
    "cleanup_distributed",
    "evaluate",
    "init_distributed",
    "load_checkpoint",
    "make_grad_scaler",
    "measure_latency",
    "restore_rng_state",
    "save_checkpoint",
    "train_epoch",
    "unwrap",
    "wrap_ddp",
]

CHECKPOINT_FORMAT = "egp_fast.checkpoint/1"
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("multistep", "cosine", "constant")


# ----------------------------------------------------------------------------------------------
# distributed
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


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP (or ``torch.compile``) wrapper.

    Args:
        model: a module, possibly wrapped.

    Returns:
        The innermost module.

    Example:
        >>> m = nn.Linear(2, 2); unwrap(m) is m
        True
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


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


def _all_reduce_sum(values: list[float], info: DistInfo | None) -> list[float]:
    if info is None or not info.distributed:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


# ----------------------------------------------------------------------------------------------
# optimisation
def build_optimizer(model: nn.Module, name: str = "sgd", *, lr: float = 0.1, momentum: float = 0.9,
                    weight_decay: float = 1e-4) -> torch.optim.Optimizer:
    """The optimizer of the EGP recipe (SGD, momentum 0.9, wd 1e-4) or AdamW.

    AdamW uses torch's fused kernel (``fused=True``) when every parameter is a floating-point
    tensor on one CPU or CUDA device, the plain for-loop AdamW otherwise.

    Args:
        model: the model whose parameters are optimised.
        name: ``sgd`` or ``adamw``.
        lr: learning rate (> 0).
        momentum: SGD momentum (AdamW ignores it).
        weight_decay: L2 / decoupled weight decay (>= 0).

    Returns:
        The optimizer.

    Raises:
        ConfigError: unknown name or out-of-range values.

    Example:
        >>> opt = build_optimizer(nn.Linear(2, 2), "sgd", lr=0.01)
    """
    if name not in OPTIMIZERS:
        raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"learning rate must be a finite number > 0, got {lr!r}")
    if not (weight_decay >= 0):
        raise ConfigError(f"--weight-decay must be >= 0, got {weight_decay!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if _fusable(params):
        # The fused kernel is the faster AdamW on CPU and GPU. On CPU it also avoids the
        # for-loop AdamW's torch.sqrt of the second moments, which (MKL on AMD CPUs) runs ~6x
        # slower on exact zeros: the pruned entries' state (BENCHMARKS.md, masked step).
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, ValueError, TypeError):
            pass  # a torch or device without the fused kernel
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _fusable(params: list[torch.Tensor]) -> bool:
    """All parameters floating point on one CPU or CUDA device (what fused AdamW takes)."""
    devices = {p.device for p in params}
    return (
        len(devices) == 1
        and next(iter(devices)).type in ("cpu", "cuda")
        and all(p.is_floating_point() for p in params)
    )


def build_scheduler(optimizer: torch.optim.Optimizer, name: str = "cosine", *, epochs: int,
                    milestones: Iterable[float] = (0.5, 0.75), gamma: float = 0.1):
    """A per-epoch learning-rate schedule.

    Args:
        optimizer: the optimizer to schedule.
        name: ``multistep`` (EGP's recipe: x``gamma`` at the ``milestones``), ``cosine``
            (anneal to 0 over ``epochs``) or ``constant``.
        epochs: epochs of the phase being scheduled (>= 0).
        milestones: multistep milestones as fractions of ``epochs`` in (0, 1] (the reference's
            80/120 of 160 epochs is 0.5, 0.75) or as absolute epochs (values > 1).
        gamma: multistep decay factor.

    Returns:
        A ``torch.optim.lr_scheduler`` object; call ``.step()`` once per epoch.

    Raises:
        ConfigError: unknown schedule or bad milestones.

    Example:
        >>> opt = build_optimizer(nn.Linear(2, 2), lr=0.1)
        >>> sch = build_scheduler(opt, "multistep", epochs=160)
        >>> sch.milestones
        Counter({80: 1, 120: 1})
    """
    if name not in SCHEDULES:
        raise ConfigError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")
    epochs = int(epochs)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, _constant_one)
    steps = []
    for m in milestones:
        m = float(m)
        if not (m > 0):
            raise ConfigError(f"--milestones must be > 0 (fractions of the epochs or epochs), got {m}")
        steps.append(int(round(m * epochs)) if m <= 1 else int(m))
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=sorted(set(steps)), gamma=gamma)


def _constant_one(epoch: int) -> float:
    # A module-level function (not a lambda) keeps the scheduler state picklable.
    return 1.0


def make_grad_scaler(device: torch.device, amp: bool):
    """A GradScaler for fp16 AMP on CUDA; ``None`` otherwise (CPU AMP uses bf16, no scaling).

    Args:
        device: the compute device.
        amp: whether AMP is on.

    Returns:
        ``torch.amp.GradScaler`` or ``None``.

    Example:
        >>> make_grad_scaler(torch.device("cpu"), True) is None
        True
    """
    if amp and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def autocast(device: torch.device, amp: bool):
    """Autocast context: fp16 on CUDA, bf16 on the CPU, nothing when ``amp`` is False.

    Args:
        device: the compute device.
        amp: whether AMP is on.

    Returns:
        A context manager.

    Example:
        >>> with autocast(torch.device("cpu"), False):
        ...     pass
    """
    if not amp:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _progress(iterable, total: int, desc: str, enabled: bool):
    return progress_bar(iterable, total=total, desc=desc, unit="batch", enabled=enabled)


def train_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, *, device: torch.device,
                amp: bool = False, scaler=None, progress: bool = False, desc: str = "train",
                dist: DistInfo | None = None) -> dict:
    """One epoch of cross-entropy training.

    Masks attached by egp_fast stay enforced (they hook ``optimizer.step``), so this loop
    needs no pruning-specific code.

    Args:
        model: the (possibly DDP-wrapped) model.
        loader: yields ``(x, y)`` on ``device``; call its ``set_epoch`` first.
        optimizer: the optimizer.
        device: compute device (for autocast).
        amp: mixed precision.
        scaler: GradScaler for fp16 on CUDA, or None.
        progress: show a tqdm bar.
        desc: bar label.
        dist: the job's DistInfo; loss and accuracy are summed over ranks.

    Returns:
        ``{"loss", "acc", "samples", "seconds"}``; acc is a fraction in [0, 1].

    Example:
        >>> from egp_fast.cli.data import load_data, make_loader
        >>> m = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))
        >>> ld = make_loader(load_data("digits", limit=64).train, 32, shuffle=True)
        >>> ld.set_epoch(0)
        >>> out = train_epoch(m, ld, build_optimizer(m, lr=0.1), device=torch.device("cpu"))
    """
    t0 = time.perf_counter()
    model.train()
    loss_sum, correct, seen = 0.0, 0.0, 0.0
    for x, y in _progress(loader, len(loader), desc, progress):
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            out = model(x)
            loss = F.cross_entropy(out.float(), y)
        if not torch.isfinite(loss):
            from egp_fast.errors import NumericsError

            raise NumericsError(f"training loss became {loss.item()} ({desc}); lower --lr or disable --amp")
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        n = y.shape[0]
        loss_sum += float(loss.detach()) * n
        correct += float((out.detach().argmax(1) == y).sum())
        seen += n
    loss_sum, correct, seen = _all_reduce_sum([loss_sum, correct, seen], dist)
    return {"loss": loss_sum / max(seen, 1), "acc": correct / max(seen, 1), "samples": int(seen),
            "seconds": time.perf_counter() - t0}


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, device: torch.device, amp: bool = False, progress: bool = False,
             desc: str = "eval", dist: DistInfo | None = None) -> dict:
    """Top-1 accuracy and mean cross-entropy over a loader (summed over ranks when distributed).

    Args:
        model: the model (evaluated in eval mode; its train/eval mode is restored afterwards).
        loader: yields ``(x, y)`` on ``device`` (evaluation order: disjoint shards).
        device: compute device.
        amp: mixed precision.
        progress: show a tqdm bar.
        desc: bar label.
        dist: the job's DistInfo.

    Returns:
        ``{"loss", "acc", "samples"}``.

    Example:
        >>> from egp_fast.cli.data import load_data, make_loader
        >>> m = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))
        >>> r = evaluate(m, make_loader(load_data("digits").test, 100), device=torch.device("cpu"))
        >>> r["samples"]
        360
    """
    was_training = model.training
    model.eval()
    loss_sum, correct, seen = 0.0, 0.0, 0.0
    try:
        for x, y in _progress(loader, len(loader), desc, progress):
            with autocast(device, amp):
                out = model(x)
            loss_sum += float(F.cross_entropy(out.float(), y, reduction="sum"))
            correct += float((out.argmax(1) == y).sum())
            seen += y.shape[0]
    finally:
        model.train(was_training)
    loss_sum, correct, seen = _all_reduce_sum([loss_sum, correct, seen], dist)
    return {"loss": loss_sum / max(seen, 1), "acc": correct / max(seen, 1), "samples": int(seen)}


@torch.no_grad()
def measure_latency(model: nn.Module, example: torch.Tensor, *, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one forward pass on ``example``, in milliseconds.

    Args:
        model: the model (run in eval mode; mode restored afterwards).
        example: an input batch on the model's device.
        repeats: timed runs.
        warmup: untimed runs first.

    Returns:
        Milliseconds per forward (CUDA is synchronised around each run).

    Example:
        >>> ms = measure_latency(nn.Linear(4, 4), torch.zeros(2, 4), repeats=3)
    """
    was_training = model.training
    model.eval()
    sync = torch.cuda.synchronize if example.is_cuda else (lambda: None)
    times = []
    try:
        for i in range(warmup + repeats):
            sync()
            t0 = time.perf_counter()
            model(example)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    finally:
        model.train(was_training)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------
# RNG state
def capture_rng_state() -> dict:
    """torch (CPU and CUDA), numpy and Python RNG states, in a ``weights_only``-loadable dict.

    Returns:
        A dict of tensors, ints and tuples.

    Example:
        >>> s = capture_rng_state(); a = torch.rand(1); restore_rng_state(s)
        >>> bool(torch.rand(1) == a)
        True
    """
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(),
                             "python": [py_version, list(py_state), py_gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss)]
    except ImportError:
        pass
    return state


def restore_rng_state(state: dict) -> None:
    """Restore what :func:`capture_rng_state` captured.

    Args:
        state: the captured dict.

    Example:
        >>> restore_rng_state(capture_rng_state())
    """
    torch.set_rng_state(state["torch"])
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


# ----------------------------------------------------------------------------------------------
# atomic files and checkpoints
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a part.

    Args:
        path: destination.
        data: file contents.

    Example:
        >>> atomic_write_bytes("/tmp/egp_demo.bin", b"ok")
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text.

    Args:
        path: destination.
        text: contents.

    Example:
        >>> atomic_write_text("/tmp/egp_demo.txt", "ok")
    """
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Save a checkpoint atomically (temporary file, fsync, ``os.replace``).

    The dict must hold only what ``torch.load(weights_only=True)`` accepts: tensors, numbers,
    strings, lists, tuples, dicts (state_dicts of models, optimizers and schedulers qualify).
    A ``"format"`` tag is added so foreign files are recognised on load.

    Args:
        path: destination file.
        state: the checkpoint contents.

    Example:
        >>> save_checkpoint("/tmp/egp_ckpt.pt", {"model": nn.Linear(2, 2).state_dict()})
    """
    import io

    buf = io.BytesIO()
    torch.save({**state, "format": CHECKPOINT_FORMAT}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Args:
        path: the checkpoint file.
        map_location: where tensors are loaded.

    Returns:
        The saved dict.

    Raises:
        CheckpointError: missing, truncated/corrupt, or not an egp_fast checkpoint.

    Example:
        >>> save_checkpoint("/tmp/egp_ckpt.pt", {"epoch": 3})
        >>> load_checkpoint("/tmp/egp_ckpt.pt")["epoch"]
        3
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist; nothing to resume from")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip/pickle errors of every kind mean the same thing to the user
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {str(e)[:200]}); "
            "delete it to restart the run, or restore it from a backup") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an egp_fast checkpoint (expected format {CHECKPOINT_FORMAT})")
    return state
