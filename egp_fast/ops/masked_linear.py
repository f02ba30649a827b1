"""masked_linear: ``y = x @ (W * M)^T + b`` with a bool mask ``M`` (True = kept).

The reference materialises ``W * M``; the Triton backend skips all-zero weight tiles and
never builds the masked weight. Gradients: ``dx = dy @ (W * M)``, ``dW = (dy^T x) * M``,
``db = sum(dy)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from egp_fast.errors import ConfigError
from egp_fast.ops._dispatch import pick, register


@register("masked_linear", "torch")
def reference_masked_linear(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference: ``F.linear(x, weight * mask, bias)`` (autograd does the rest)."""
    return F.linear(x, weight * mask.to(weight.dtype), bias)


def masked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Linear layer with a pruning mask: ``x @ (weight * mask)^T + bias``.

    Args:
        x: ``[..., in_features]``.
        weight: ``[out_features, in_features]``.
        mask: bool, same shape as ``weight``; ``True`` = kept.
        bias: optional ``[out_features]``.
        backend: ``None`` (automatic), ``"torch"`` or ``"triton"``.

    Returns:
        ``[..., out_features]``, differentiable in ``x``, ``weight`` (masked) and ``bias``.

    Example:
        >>> import torch, egp_fast
        >>> w = torch.eye(2); m = torch.tensor([[True, False], [False, False]])
        >>> egp_fast.ops.masked_linear(torch.ones(1, 2), w, m)
        tensor([[1., 0.]])
    """
    if weight.dim() != 2:
        raise ConfigError(f"masked_linear: weight must be 2-d, got shape {tuple(weight.shape)}")
    if mask.shape != weight.shape or mask.dtype != torch.bool:
        raise ConfigError(
            f"masked_linear: mask must be a bool tensor of shape {tuple(weight.shape)}, got "
            f"{mask.dtype} {tuple(mask.shape)}"
        )
    if x.shape[-1] != weight.shape[1]:
        raise ConfigError(
            f"masked_linear: x has {x.shape[-1]} features in its last dim but weight expects "
            f"{weight.shape[1]}"
        )
    _, fn = pick("masked_linear", backend, x.device)
    return fn(x, weight, mask, bias)
