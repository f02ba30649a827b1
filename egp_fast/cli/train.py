"""Training pieces behind ``egp-fast``: optimizer, schedule, AMP, the epoch loops, latency.

Everything here is independent of the pruning core: the CLI composes these with
:class:`egp_fast.Pruner`. The loops sum their counts over the ranks of a ``torchrun`` job
(:mod:`egp_fast.cli.distributed`); checkpoints live in :mod:`egp_fast.cli.checkpoints`.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from egp_fast._progress import progress_bar
from egp_fast.cli.distributed import DistInfo, all_reduce_sum
from egp_fast.errors import ConfigError, NumericsError

__all__ = [
    "autocast",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "make_grad_scaler",
    "measure_latency",
    "train_epoch",
]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("multistep", "cosine", "constant")


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
        # for-loop AdamW's torch.sqrt of the second moments, which (MKL on some CPUs) is much
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


# ----------------------------------------------------------------------------------------------
# loops
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
        progress: show a progress bar (drawn only on a terminal).
        desc: bar label.
        dist: the job's DistInfo; loss and accuracy are summed over ranks.

    Returns:
        ``{"loss", "acc", "samples", "seconds"}``; acc is a fraction in [0, 1].

    Example:
        >>> from egp_fast.cli.data import load_data
        >>> from egp_fast.cli.loader import make_loader
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
    loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], dist)
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
        progress: show a progress bar (drawn only on a terminal).
        desc: bar label.
        dist: the job's DistInfo.

    Returns:
        ``{"loss", "acc", "samples"}``.

    Example:
        >>> from egp_fast.cli.data import load_data
        >>> from egp_fast.cli.loader import make_loader
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
    loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], dist)
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

