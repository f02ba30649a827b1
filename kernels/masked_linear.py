"""Triton kernels for ``masked_linear``: ``y = x @ (W * M)^T + b`` with all-zero tiles skipped.

The weight is cut into ``BLOCK_N x BLOCK_K`` tiles. ``_tile_occupancy_kernel`` marks, per
tile, whether any kept weight is nonzero (``occ``), whether any entry is kept at all
(``occ_mask``, which decides where the weight gradient can be nonzero), and whether any
*pruned* entry still holds a nonzero value (``dirty``: then the kernels must apply the mask
while loading; when masks are enforced, as ``Pruner`` does, the weight itself is the zeroed
weight and the mask is never read by the matmul kernels). The host turns ``occ`` into
compressed lists (per output row-tile: the K-tiles to visit; per K-tile: the N-tiles to
visit; the kept tiles for the weight gradient), so each program loops only over occupied
tiles and the cost falls with the number of zero tiles. ``W * M`` is never materialised.

Three matmul kernels share those lists (the two backward ones live in
:mod:`egp_fast.kernels.masked_linear_backward`):

* ``_masked_linear_kernel``:    ``Y[m, n] = sum_k X[m, k] Wm[n, k] + b[n]``
* ``_masked_linear_dx_kernel``: ``dX[m, k] = sum_n dY[m, n] Wm[n, k]``
* ``_masked_linear_dw_kernel``: ``dW[n, k] = M[n, k] * sum_m dY[m, n] X[m, k]``, only for
  tiles with a kept entry (the others stay zero)

All accumulate in fp32 and store in the input dtype; fp32 inputs use IEEE fp32 products
unless ``torch.backends.cuda.matmul.allow_tf32`` is set (torch's own rule for ``F.linear``).
"""

from __future__ import annotations

if not __name__.startswith("egp_fast."):
    # kernels/ sits at the top of the repository, where `python -m ...` puts it on sys.path:
    # refuse to load as a top-level `kernels`, which is Hugging Face's package name.
    raise ImportError(f"{__name__!r}: egp_fast's Triton kernels are importable only as egp_fast.kernels")

import torch
import triton
import triton.language as tl


@triton.jit
def _tile_occupancy_kernel(
    W_ptr,
    M_ptr,
    Occ_ptr,
    OccMask_ptr,
    Dirty_ptr,
    N,
    K,
    W_row_stride,
    W_col_stride,
    M_row_stride,
    M_col_stride,
    n_tiles_k,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per tile ``(i, j)``: ``occ = any(W != 0 & M)``, ``occ_mask = any(M)``,
    ``dirty = any(W != 0 & ~M)`` over ``W[i*BN:(i+1)*BN, j*BK:(j+1)*BK]`` (int8 outputs)."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    inb = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    w = tl.load(W_ptr + offs_n[:, None] * W_row_stride + offs_k[None, :] * W_col_stride, mask=inb, other=0)
    m = tl.load(M_ptr + offs_n[:, None] * M_row_stride + offs_k[None, :] * M_col_stride, mask=inb, other=0)
    kept = (m != 0) & inb
    nz = (w != 0) & inb
    occ = tl.max(tl.max((nz & kept).to(tl.int32), axis=1), axis=0)
    occ_m = tl.max(tl.max(kept.to(tl.int32), axis=1), axis=0)
    dirty = tl.max(tl.max((nz & (m == 0)).to(tl.int32), axis=1), axis=0)
    t = pid_n * n_tiles_k + pid_k
    tl.store(Occ_ptr + t, occ.to(tl.int8))
    tl.store(OccMask_ptr + t, occ_m.to(tl.int8))
    tl.store(Dirty_ptr + t, dirty.to(tl.int8))


@triton.jit
def _grouped_tile(pid, n_m, n_other, GROUP_M: tl.constexpr):
    """(row tile, other tile) of program ``pid`` in grouped order: GROUP_M row tiles share each
    weight tile while it is in L2."""
    per_group = GROUP_M * n_other
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


@triton.jit
def _load_w_tile(W_ptr, M_ptr, offs_n, offs_k, mask_n, mask_k, W_row_stride, W_col_stride,
                 M_row_stride, M_col_stride, APPLY_MASK: tl.constexpr):
    """The ``[BLOCK_N, BLOCK_K]`` tile of ``W * M`` (the mask is read only when W is dirty)."""
    inb = mask_n[:, None] & mask_k[None, :]
    w = tl.load(W_ptr + offs_n[:, None] * W_row_stride + offs_k[None, :] * W_col_stride, mask=inb, other=0.0)
    if APPLY_MASK:
        keep = tl.load(M_ptr + offs_n[:, None] * M_row_stride + offs_k[None, :] * M_col_stride, mask=inb, other=0)
        w = tl.where(keep != 0, w, tl.zeros_like(w))
    return w


@triton.jit
def _masked_linear_kernel(
    X_ptr,
    W_ptr,
    M_ptr,
    Bias_ptr,
    Y_ptr,
    RowPtr_ptr,
    RowIdx_ptr,
    M_rows,
    N,
    K,
    X_row_stride,
    X_col_stride,
    W_row_stride,
    W_col_stride,
    M_row_stride,
    M_col_stride,
    Y_row_stride,
    Y_col_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    APPLY_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``Y[m, n] = sum over occupied K-tiles of X[m, k] * (W * M)[n, k]  (+ bias[n])``."""
    pid = tl.program_id(0).to(tl.int64)
    n_m = tl.cdiv(M_rows, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _grouped_tile(pid, n_m, n_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_kk = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_m = offs_m < M_rows
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    lo = tl.load(RowPtr_ptr + pid_n)
    hi = tl.load(RowPtr_ptr + pid_n + 1)
    for i in range(lo, hi):
        kt = tl.load(RowIdx_ptr + i).to(tl.int64)
        offs_k = kt * BLOCK_K + offs_kk
        mask_k = offs_k < K
        x = tl.load(
            X_ptr + offs_m[:, None] * X_row_stride + offs_k[None, :] * X_col_stride,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        w = _load_w_tile(W_ptr, M_ptr, offs_n, offs_k, mask_n, mask_k, W_row_stride, W_col_stride,
                         M_row_stride, M_col_stride, APPLY_MASK)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        b = tl.load(Bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += b[None, :]
    tl.store(
        Y_ptr + offs_m[:, None] * Y_row_stride + offs_n[None, :] * Y_col_stride,
        acc.to(Y_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


# Tile configuration per device type. GPU: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps,
# stages) for bf16/fp16 on Hopper; the interpreter runs one program at a time, so it gets
# the smallest tiles tl.dot accepts (16) to keep test matrices small yet multi-tile.
_GPU_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4}
_GPU_CONFIG_FP32 = {
    "BLOCK_M": 64,
    "BLOCK_N": 64,
    "BLOCK_K": 32,
    "GROUP_M": 8,
    "num_warps": 4,
    "num_stages": 3,
}
_CPU_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 1}
# Weight-gradient kernel: reduction over the batch in steps of this many rows.
_DW_BLOCK_M = {"cuda": 64, "cpu": 16}


def kernel_config(device: torch.device, dtype: torch.dtype) -> dict[str, int]:
    """The tile configuration the kernels use for tensors of ``dtype`` on ``device``.

    Args:
        device: where the tensors live.
        dtype: the weight/input dtype.

    Returns:
        A dict with ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, ``GROUP_M``, ``num_warps``,
        ``num_stages``. ``(BLOCK_N, BLOCK_K)`` is the granularity of tile skipping.

    Example:
        >>> kernel_config(torch.device("cpu"), torch.float32)["BLOCK_N"]
        16
    """
    if device.type != "cuda":
        return dict(_CPU_CONFIG)
    return dict(_GPU_CONFIG_FP32 if dtype == torch.float32 else _GPU_CONFIG)


def tile_shape(device: torch.device, dtype: torch.dtype) -> tuple[int, int]:
    """``(BLOCK_N, BLOCK_K)``: the weight tile that is skipped when all its kept entries are 0."""
    cfg = kernel_config(device, dtype)
    return cfg["BLOCK_N"], cfg["BLOCK_K"]


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _mask_u8(mask: torch.Tensor) -> torch.Tensor:
    # bool loads as int1 in Triton; a uint8 view of the same bytes is read the same everywhere.
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def tile_occupancy_triton(
    weight: torch.Tensor, mask: torch.Tensor, block_n: int, block_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tile maps of ``weight`` under ``mask`` in one pass: ``(occ, occ_mask, dirty)``.

    Args:
        weight: ``[N, K]`` floating.
        mask: bool ``[N, K]``, True = kept.
        block_n, block_k: tile shape.

    Returns:
        Three int8 tensors ``[ceil(N / block_n), ceil(K / block_k)]``: any kept nonzero, any
        kept entry, any nonzero entry that the mask prunes.

    Example:
        >>> w = torch.randn(40, 40, device="cuda"); m = w > 0
        >>> occ, occ_m, dirty = tile_occupancy_triton(w, m, 16, 16)  # doctest: +SKIP
    """
    n, k = weight.shape
    nt_n, nt_k = triton.cdiv(n, block_n), triton.cdiv(k, block_k)
    out = torch.empty(3, nt_n, nt_k, dtype=torch.int8, device=weight.device)
    if nt_n and nt_k:
        m8 = _mask_u8(mask)
        _tile_occupancy_kernel[(nt_n, nt_k)](
            weight,
            m8,
            out[0],
            out[1],
            out[2],
            n,
            k,
            weight.stride(0),
            weight.stride(1),
            m8.stride(0),
            m8.stride(1),
            nt_k,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            num_warps=4,
        )
    return out[0], out[1], out[2]


def masked_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    row_ptr: torch.Tensor,
    row_idx: torch.Tensor,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Forward launch: ``x @ (weight * mask)^T + bias`` visiting only the listed K-tiles.

    Args:
        x: ``[M, K]``.
        weight: ``[N, K]``.
        mask: bool ``[N, K]`` applied while loading, or ``None`` when ``weight`` is already
            zero wherever the mask is False (the usual case under ``Pruner``).
        bias: ``[N]`` or ``None``.
        row_ptr: int32 ``[ceil(N / BLOCK_N) + 1]``; row-tile ``i`` visits
            ``row_idx[row_ptr[i]:row_ptr[i+1]]``.
        row_idx: int32 K-tile indices.
        config: tile configuration (default :func:`kernel_config`).

    Returns:
        ``[M, N]`` in ``x``'s dtype.

    Example:
        >>> y = masked_linear_triton(x, w, None, b, tm.row_ptr, tm.row_idx)  # doctest: +SKIP
    """
    cfg = config or kernel_config(x.device, x.dtype)
    m_rows, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m_rows, n, dtype=x.dtype, device=x.device)
    if m_rows == 0 or n == 0:
        return y
    m8 = _mask_u8(mask) if mask is not None else weight
    grid = (triton.cdiv(m_rows, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _masked_linear_kernel[grid](
        x,
        weight,
        m8,
        bias if bias is not None else weight,
        y,
        row_ptr,
        row_idx,
        m_rows,
        n,
        k,
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        m8.stride(0),
        m8.stride(1),
        y.stride(0),
        y.stride(1),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"],
        APPLY_MASK=mask is not None,
        HAS_BIAS=bias is not None,
        PRECISION=_precision(x.dtype),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return y
