"""Triton kernels for the backward pass of ``masked_linear``: input and weight gradients.

* ``_masked_linear_dx_kernel``: ``dX[m, k] = sum_n dY[m, n] Wm[n, k]``, visiting per K-tile
  only the N-tiles with a kept weight;
* ``_masked_linear_dw_kernel``: ``dW[n, k] = M[n, k] * sum_m dY[m, n] X[m, k]``, only for tiles
  with a kept entry (the others stay zero).

The tile lists, configurations and shared tile helpers come from
:mod:`egp_fast.kernels.masked_linear` (the forward kernel and the tile occupancy pass).
"""

from __future__ import annotations

if not __name__.startswith("egp_fast."):
    # kernels/ sits at the top of the repository, where `python -m ...` puts it on sys.path:
    # refuse to load as a top-level `kernels`, which is Hugging Face's package name.
    raise ImportError(f"{__name__!r}: egp_fast's Triton kernels are importable only as egp_fast.kernels")

import torch
import triton
import triton.language as tl

from egp_fast.kernels.masked_linear import (
    _DW_BLOCK_M,
    _grouped_tile,
    _load_w_tile,
    _mask_u8,
    _precision,
    kernel_config,
)

@triton.jit
def _masked_linear_dx_kernel(
    DY_ptr,
    W_ptr,
    M_ptr,
    DX_ptr,
    ColPtr_ptr,
    ColIdx_ptr,
    M_rows,
    N,
    K,
    DY_row_stride,
    DY_col_stride,
    W_row_stride,
    W_col_stride,
    M_row_stride,
    M_col_stride,
    DX_row_stride,
    DX_col_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    APPLY_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``dX[m, k] = sum over occupied N-tiles of dY[m, n] * (W * M)[n, k]``."""
    pid = tl.program_id(0).to(tl.int64)
    n_m = tl.cdiv(M_rows, BLOCK_M)
    n_k = tl.cdiv(K, BLOCK_K)
    pid_m, pid_k = _grouped_tile(pid, n_m, n_k, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    offs_nn = tl.arange(0, BLOCK_N).to(tl.int64)
    mask_m = offs_m < M_rows
    mask_k = offs_k < K
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    lo = tl.load(ColPtr_ptr + pid_k)
    hi = tl.load(ColPtr_ptr + pid_k + 1)
    for i in range(lo, hi):
        nt = tl.load(ColIdx_ptr + i).to(tl.int64)
        offs_n = nt * BLOCK_N + offs_nn
        mask_n = offs_n < N
        dy = tl.load(
            DY_ptr + offs_m[:, None] * DY_row_stride + offs_n[None, :] * DY_col_stride,
            mask=mask_m[:, None] & mask_n[None, :],
            other=0.0,
        )
        w = _load_w_tile(W_ptr, M_ptr, offs_n, offs_k, mask_n, mask_k, W_row_stride, W_col_stride,
                         M_row_stride, M_col_stride, APPLY_MASK)
        acc = tl.dot(dy, w, acc, input_precision=PRECISION)
    tl.store(
        DX_ptr + offs_m[:, None] * DX_row_stride + offs_k[None, :] * DX_col_stride,
        acc.to(DX_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_k[None, :],
    )


@triton.jit
def _masked_linear_dw_kernel(
    DY_ptr,
    X_ptr,
    M_ptr,
    DW_ptr,
    Tiles_ptr,
    M_rows,
    N,
    K,
    DY_row_stride,
    DY_col_stride,
    X_row_stride,
    X_col_stride,
    M_row_stride,
    M_col_stride,
    DW_row_stride,
    DW_col_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """For kept tile ``t = (Tiles[t, 0], Tiles[t, 1])``:
    ``dW[n, k] = M[n, k] * sum_m dY[m, n] X[m, k]`` (tiles not listed are left untouched)."""
    t = tl.program_id(0).to(tl.int64)
    nt = tl.load(Tiles_ptr + 2 * t).to(tl.int64)
    kt = tl.load(Tiles_ptr + 2 * t + 1).to(tl.int64)
    offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    offs_mm = tl.arange(0, BLOCK_M).to(tl.int64)
    mask_n = offs_n < N
    mask_k = offs_k < K
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for m0 in range(0, M_rows, BLOCK_M):
        offs_m = m0 + offs_mm
        mask_m = offs_m < M_rows
        dy_t = tl.load(
            DY_ptr + offs_n[:, None] * DY_col_stride + offs_m[None, :] * DY_row_stride,
            mask=mask_n[:, None] & mask_m[None, :],
            other=0.0,
        )
        x = tl.load(
            X_ptr + offs_m[:, None] * X_row_stride + offs_k[None, :] * X_col_stride,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        acc = tl.dot(dy_t, x, acc, input_precision=PRECISION)
    inb = mask_n[:, None] & mask_k[None, :]
    keep = tl.load(M_ptr + offs_n[:, None] * M_row_stride + offs_k[None, :] * M_col_stride, mask=inb, other=0)
    acc = tl.where(keep != 0, acc, 0.0)
    tl.store(
        DW_ptr + offs_n[:, None] * DW_row_stride + offs_k[None, :] * DW_col_stride,
        acc.to(DW_ptr.dtype.element_ty),
        mask=inb,
    )


def masked_linear_dx_triton(
    dy: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor | None,
    col_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Input gradient ``dy @ (weight * mask)`` visiting only the listed N-tiles per K-tile.

    Args:
        dy: ``[M, N]``.
        weight: ``[N, K]``.
        mask: bool ``[N, K]`` or ``None`` (weight already zeroed).
        col_ptr: int32 ``[ceil(K / BLOCK_K) + 1]``; K-tile ``j`` visits
            ``col_idx[col_ptr[j]:col_ptr[j+1]]``.
        col_idx: int32 N-tile indices.
        config: tile configuration (default :func:`kernel_config`).

    Returns:
        ``[M, K]`` in ``dy``'s dtype.

    Example:
        >>> dx = masked_linear_dx_triton(dy, w, None, tm.col_ptr, tm.col_idx)  # doctest: +SKIP
    """
    cfg = config or kernel_config(dy.device, dy.dtype)
    m_rows, n = dy.shape
    k = weight.shape[1]
    dx = torch.empty(m_rows, k, dtype=dy.dtype, device=dy.device)
    if m_rows == 0 or k == 0:
        return dx
    m8 = _mask_u8(mask) if mask is not None else weight
    grid = (triton.cdiv(m_rows, cfg["BLOCK_M"]) * triton.cdiv(k, cfg["BLOCK_K"]),)
    _masked_linear_dx_kernel[grid](
        dy,
        weight,
        m8,
        dx,
        col_ptr,
        col_idx,
        m_rows,
        n,
        k,
        dy.stride(0),
        dy.stride(1),
        weight.stride(0),
        weight.stride(1),
        m8.stride(0),
        m8.stride(1),
        dx.stride(0),
        dx.stride(1),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"],
        APPLY_MASK=mask is not None,
        PRECISION=_precision(dy.dtype),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return dx


def masked_linear_dw_triton(
    dy: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor,
    grad_tiles: torch.Tensor,
    out_dtype: torch.dtype,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Masked weight gradient ``(dy^T @ x) * mask``, computed only on tiles with a kept entry.

    Args:
        dy: ``[M, N]``.
        x: ``[M, K]``.
        mask: bool ``[N, K]``.
        grad_tiles: int32 ``[T, 2]`` (row-tile, col-tile) pairs holding a kept entry.
        out_dtype: dtype of the weight.
        config: tile configuration (default :func:`kernel_config`).

    Returns:
        ``[N, K]``: exactly zero wherever ``mask`` is False.

    Example:
        >>> dw = masked_linear_dw_triton(dy, x, m, tm.grad_tiles, w.dtype)  # doctest: +SKIP
    """
    cfg = config or kernel_config(dy.device, dy.dtype)
    m_rows, n = dy.shape
    k = x.shape[1]
    dw = torch.zeros(n, k, dtype=out_dtype, device=dy.device)
    n_tiles = grad_tiles.shape[0]
    if n_tiles == 0 or n == 0 or k == 0:
        return dw
    m8 = _mask_u8(mask)
    tiles = grad_tiles.contiguous()
    block_m = _DW_BLOCK_M["cuda" if dy.device.type == "cuda" else "cpu"]
    _masked_linear_dw_kernel[(n_tiles,)](
        dy,
        x,
        m8,
        dw,
        tiles,
        m_rows,
        n,
        k,
        dy.stride(0),
        dy.stride(1),
        x.stride(0),
        x.stride(1),
        m8.stride(0),
        m8.stride(1),
        dw.stride(0),
        dw.stride(1),
        BLOCK_M=block_m,
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        PRECISION=_precision(dy.dtype),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return dw
