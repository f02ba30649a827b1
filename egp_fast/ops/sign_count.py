"""sign_count: per-channel counts of ``z > threshold``, accumulated in place.

This is the inner loop of entropy measurement: for every nonlinearity site and every batch,
count how often each channel's pre-activation is ON. Counts are int64 and stay on the
tensor's device, so a whole measurement pass needs no host synchronisation.

:func:`relu_sign_count` is the same count fused with the ReLU that follows it: a measured
``nn.ReLU`` reads its input once instead of twice (once for the count, once for the ReLU).
"""

from __future__ import annotations

import torch

from egp_fast.errors import ConfigError
from egp_fast.ops._dispatch import pick, register


def _check(z: torch.Tensor, counts: torch.Tensor, channel_dim: int, op: str = "sign_count_") -> int:
    if not isinstance(z, torch.Tensor):
        raise ConfigError(f"{op}: z must be a tensor, got {type(z).__name__}")
    if z.dim() == 0:
        raise ConfigError(f"{op}: z must have a channel dimension; got a 0-d tensor")
    if not -z.dim() <= channel_dim < z.dim():
        raise ConfigError(
            f"{op}: channel_dim={channel_dim} is out of range for a {z.dim()}-d tensor "
            f"of shape {tuple(z.shape)}"
        )
    dim = channel_dim % z.dim()
    if counts.dtype != torch.int64:
        raise ConfigError(f"{op}: counts must be int64, got {counts.dtype}")
    if counts.dim() != 1 or counts.numel() != z.shape[dim]:
        raise ConfigError(
            f"{op}: counts must have shape [{z.shape[dim]}] (channels of z along "
            f"dim {channel_dim}), got {tuple(counts.shape)}"
        )
    if counts.device != z.device:
        raise ConfigError(
            f"{op}: counts is on {counts.device} but z is on {z.device}; "
            "allocate counts on the activation's device"
        )
    if z.is_complex() or z.dtype == torch.bool:
        raise ConfigError(f"{op}: z must be a real floating or integer tensor, got {z.dtype}")
    return dim


@register("sign_count", "torch")
def reference_sign_count_(
    z: torch.Tensor, counts: torch.Tensor, channel_dim: int, threshold: float = 0.0
) -> torch.Tensor:
    """Reference: ``counts[c] += #{z[..., c, ...] > threshold}`` along ``channel_dim``.

    NaN compares False, so NaN entries count as OFF. Returns ``counts``.
    """
    dim = channel_dim % z.dim()
    dims = [d for d in range(z.dim()) if d != dim]
    on = z > threshold
    if dims:
        counts.add_(on.sum(dim=dims, dtype=torch.int64))
    else:
        counts.add_(on.to(torch.int64))
    return counts


def sign_count_(
    z: torch.Tensor,
    counts: torch.Tensor,
    channel_dim: int,
    threshold: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Add per-channel counts of ``z > threshold`` into ``counts`` in place.

    Args:
        z: pre-activation tensor, any layout (``[N, C, H, W]`` with ``channel_dim=1``,
            ``[N, L, C]`` or ``[N, H, W, C]`` with ``channel_dim=-1``, channels-last...).
        counts: int64 tensor ``[C]`` on ``z``'s device; updated in place.
        channel_dim: the channel axis of ``z`` (negative values count from the end).
        threshold: count values strictly greater than this (0 gives the ON count of a
            ReLU; multi-piece activations such as ReLU6 count once per breakpoint).
        backend: ``None`` (automatic), ``"torch"``, ``"cpp"``, ``"cuda"`` or ``"triton"``.

    Returns:
        ``counts``, for chaining.

    Example:
        >>> import torch, egp_fast
        >>> z = torch.tensor([[1.0, -1.0], [2.0, 0.0]])
        >>> egp_fast.ops.sign_count_(z, torch.zeros(2, dtype=torch.int64), channel_dim=1)
        tensor([2, 0])
    """
    _check(z, counts, channel_dim)
    if z.numel() == 0:
        return counts
    _, fn = pick("sign_count", backend, z.device)
    return fn(z, counts, channel_dim, float(threshold))


@register("relu_sign_count", "torch")
def reference_relu_sign_count(
    z: torch.Tensor, counts: torch.Tensor, channel_dim: int, inplace: bool = False
) -> torch.Tensor:
    """Reference: ``sign_count_(z, counts, channel_dim, 0)``, then ``torch.relu`` (in place
    with ``inplace``). Differentiable through the ReLU, as ``torch.relu`` is."""
    reference_sign_count_(z, counts, channel_dim, 0.0)
    return torch.relu_(z) if inplace else torch.relu(z)


def relu_sign_count(
    z: torch.Tensor,
    counts: torch.Tensor,
    channel_dim: int,
    *,
    inplace: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """``torch.relu(z)``, adding the per-channel counts of ``z > 0`` into ``counts`` on the way.

    The result is bit for bit what ``torch.relu(z)`` (``torch.relu_(z)`` with ``inplace``)
    returns: same values (``-0.0`` stays ``-0.0``, NaN stays NaN), same dtype, same strides
    (channels-last stays channels-last); ``counts`` gains what
    ``sign_count_(z, counts, channel_dim, 0.0)`` would add. The C++ kernel does both in one
    read of ``z``; a ``z`` that needs a gradient goes to the reference, which autograd can
    differentiate.

    Args:
        z: the ReLU's input, any layout (see :func:`sign_count_`).
        counts: int64 tensor ``[C]`` on ``z``'s device; updated in place.
        channel_dim: the channel axis of ``z``.
        inplace: write the ReLU into ``z`` and return ``z`` (as ``nn.ReLU(inplace=True)``).
        backend: ``None`` (automatic), ``"torch"``, ``"cpp"`` (CPU) or ``"triton"`` (CUDA).

    Returns:
        The ReLU of ``z`` (``z`` itself with ``inplace``).

    Example:
        >>> import torch, egp_fast
        >>> counts = torch.zeros(2, dtype=torch.int64)
        >>> egp_fast.ops.relu_sign_count(torch.tensor([[1.0, -1.0], [2.0, 0.0]]), counts, channel_dim=1)
        tensor([[1., 0.],
                [2., 0.]])
        >>> counts
        tensor([2, 0])
    """
    _check(z, counts, channel_dim, "relu_sign_count")
    if not isinstance(inplace, bool):
        raise ConfigError(f"relu_sign_count: inplace must be True or False, got {inplace!r}")
    if z.requires_grad and torch.is_grad_enabled():
        return reference_relu_sign_count(z, counts, channel_dim, inplace)
    _, fn = pick("relu_sign_count", backend, z.device)
    return fn(z, counts, channel_dim, inplace)
