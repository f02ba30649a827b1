"""Triton implementations of ``sign_count``, ``entropy`` and ``masked_linear``.

Imported by :mod:`egp_fast.ops` inside ``try/except ImportError``: without Triton this
module raises ImportError and the other backends serve. The kernels run on CUDA tensors,
or on CPU tensors when ``TRITON_INTERPRET=1`` was set before this import (the tests).

``masked_linear`` picks, per tile map (see :class:`~egp_fast.ops.masked_linear.TileMap`):

* the tile-skipping Triton kernels when few tiles are occupied (density below
  :data:`DENSE_DENSITY`), or always under the interpreter;
* cuBLAS (``F.linear``) on the already-zeroed weight when most tiles are occupied, since
  a dense vendor GEMM beats any tile-skipping kernel when there is little to skip. The
  weight is used as-is when it is already zero under the mask (``TileMap.clean``); only a
  "dirty" weight at high density is multiplied by the mask first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton  # noqa: F401  (presence check: the ops package skips this module without it)
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(f"egp_fast Triton backend needs triton: {e}") from e

from egp_fast.kernels.entropy import entropy_triton
from egp_fast.kernels.masked_linear import kernel_config, masked_linear_triton, tile_occupancy_triton
from egp_fast.kernels.masked_linear_backward import masked_linear_dw_triton, masked_linear_dx_triton
from egp_fast.kernels.sign_count import SUPPORTED_DTYPES, relu_sign_count_triton, sign_count_triton
from egp_fast.ops._dispatch import register
from egp_fast.ops.entropy import EntropyOut
from egp_fast.ops.masked_linear import (
    TileMap,
    active_tile_map_cache,
    default_tile_map_cache,
    reference_masked_linear,
)
from egp_fast.ops.sign_count import reference_relu_sign_count, reference_sign_count_

# Tile density at or above which masked_linear hands a CUDA call to cuBLAS. Measured on an
# H200, x[8192, 4096] @ W[4096, 4096]^T bf16, kernel alone with the tile map prebuilt
# (128x128x64 tiles, 8 warps, 4 stages): 0.566 ms at density 1, 0.305 at 0.49, 0.085 at 0.09,
# i.e. about 0.57 ms x density; cuBLAS on the zeroed weight takes ~0.37-0.39 ms at any
# density. The two cross near 0.65; switching at 0.6 kept the op >= 1.06x the reference
# (F.linear(x, W * M, b)) at every density measured (0.01 .. 1).
DENSE_DENSITY = 0.6


@register("sign_count", "triton")
def triton_sign_count_(
    z: torch.Tensor, counts: torch.Tensor, channel_dim: int, threshold: float = 0.0
) -> torch.Tensor:
    """Triton ``sign_count_`` (same contract as the reference).

    fp32/fp16/bf16 inputs run the kernel; other dtypes (fp64, integers) use the reference,
    whose comparison rules for those dtypes the kernel does not reproduce.
    """
    if z.dtype not in SUPPORTED_DTYPES:
        return reference_sign_count_(z, counts, channel_dim, threshold)
    return sign_count_triton(z, counts, channel_dim, threshold)


@register("relu_sign_count", "triton")
def triton_relu_sign_count(
    z: torch.Tensor, counts: torch.Tensor, channel_dim: int, inplace: bool = False
) -> torch.Tensor:
    """Triton ReLU with its ON count in the same launch (same contract as the reference)."""
    if z.dtype not in SUPPORTED_DTYPES:
        return reference_relu_sign_count(z, counts, channel_dim, inplace)
    return relu_sign_count_triton(z, counts, channel_dim, inplace)


@register("entropy", "triton")
def triton_entropy(counts: torch.Tensor, observations: torch.Tensor, offsets: torch.Tensor) -> EntropyOut:
    """Triton entropy epilogue: one launch for all sites (same contract as the reference)."""
    return EntropyOut(*entropy_triton(counts, observations, offsets))


def _tile_map(weight: torch.Tensor, mask: torch.Tensor) -> TileMap:
    cfg = kernel_config(weight.device, weight.dtype)
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    cache = active_tile_map_cache() or default_tile_map_cache(weight, mask)
    return cache.get(weight, mask, bn, bk, tile_occupancy_triton)


def _use_dense(tm: TileMap, device: torch.device) -> bool:
    # The interpreter exists to test the kernels, so it never takes the cuBLAS shortcut.
    return device.type == "cuda" and tm.density >= DENSE_DENSITY


class _MaskedLinearFn(torch.autograd.Function):
    """Autograd wrapper: x ``[M, K]`` (leading dims already flattened)."""

    @staticmethod
    def forward(ctx, x, weight, mask, bias, tm: TileMap, dense: bool):
        mask_arg = None if tm.clean else mask
        if dense:
            w_eff = weight if tm.clean else weight * mask.to(weight.dtype)
            y = F.linear(x, w_eff, bias)
        else:
            y = masked_linear_triton(x, weight, mask_arg, bias, tm.row_ptr, tm.row_idx)
        ctx.save_for_backward(x, weight, mask)
        ctx.tm = tm
        ctx.dense = dense
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mask = ctx.saved_tensors
        tm: TileMap = ctx.tm
        dy = dy.contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            if ctx.dense:
                w_eff = weight if tm.clean else weight * mask.to(weight.dtype)
                dx = dy @ w_eff
            else:
                dx = masked_linear_dx_triton(dy, weight, None if tm.clean else mask, tm.col_ptr, tm.col_idx)
        if ctx.needs_input_grad[1]:
            if ctx.dense:
                dw = (dy.t() @ x) * mask.to(weight.dtype)
            else:
                dw = masked_linear_dw_triton(dy, x, mask, tm.grad_tiles, weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = dy.sum(0, dtype=torch.float32).to(dy.dtype)
        return dx, dw, None, db, None, None


@register("masked_linear", "triton")
def triton_masked_linear(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Tile-skipping masked linear (same contract as the reference).

    Mixed dtypes (x, weight and bias differ) go to the reference, which reports them the way
    ``F.linear`` does.
    """
    if (
        x.dtype != weight.dtype
        or (bias is not None and bias.dtype != weight.dtype)
        or not x.is_floating_point()
    ):
        return reference_masked_linear(x, weight, mask, bias)
    tm = _tile_map(weight, mask)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = _MaskedLinearFn.apply(x2, weight, mask, bias, tm, _use_dense(tm, x.device))
    return y.reshape(*lead, weight.shape[0])
