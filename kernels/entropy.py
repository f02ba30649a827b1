"""Triton entropy epilogue: channel and layer entropies of every site in one launch.

One program per site walks that site's channels (``offsets[s]:offsets[s+1]``) in blocks,
writes ``p_on`` and the channel entropy, and reduces the site's layer entropies, so a
measurement pass ends with a single small kernel instead of a Python loop over sites. All
arithmetic is float64 so the result matches the float64 reference to rounding (~1e-16).
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
def _entropy_kernel(
    Counts_ptr,
    Obs_ptr,
    Offsets_ptr,
    P_ptr,
    H_ptr,
    Layer_ptr,
    LayerAll_ptr,
    BLOCK_SIZE: tl.constexpr,
):
    """For site ``s = program_id(0)`` and each channel ``t`` of it:

    ``p[t] = counts[t] / obs[t]`` (0 when ``obs[t] == 0``),
    ``H[t] = -p log2 p - (1-p) log2 (1-p)`` (0 unless ``0 < p < 1``),
    ``layer[s] = sum H / #{0 < p < 1}`` (0 if none), ``layer_all[s] = sum H / #channels``.
    """
    s = tl.program_id(0).to(tl.int64)
    lo = tl.load(Offsets_ptr + s)
    hi = tl.load(Offsets_ptr + s + 1)
    sum_h = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    n_nc = tl.zeros([BLOCK_SIZE], dtype=tl.int64)
    for start in range(lo, hi, BLOCK_SIZE):
        offs = start + tl.arange(0, BLOCK_SIZE).to(tl.int64)
        m = offs < hi
        cnt = tl.load(Counts_ptr + offs, mask=m, other=0).to(tl.float64)
        obs = tl.load(Obs_ptr + offs, mask=m, other=0).to(tl.float64)
        has_obs = obs > 0
        p = tl.where(has_obs, cnt / tl.where(has_obs, obs, 1.0), 0.0)
        q = 1.0 - p
        nonconst = (p > 0.0) & (p < 1.0)
        # Clamp the log arguments away from 0 so constant channels produce no NaN/-inf.
        ps = tl.where(nonconst, p, 0.5)
        qs = tl.where(nonconst, q, 0.5)
        h = -(ps * tl.log2(ps) + qs * tl.log2(qs))
        h = tl.where(nonconst, h, 0.0)
        tl.store(P_ptr + offs, p, mask=m)
        tl.store(H_ptr + offs, h, mask=m)
        sum_h += tl.where(m, h, 0.0)
        n_nc += (nonconst & m).to(tl.int64)
    total_h = tl.sum(sum_h, axis=0)
    total_nc = tl.sum(n_nc, axis=0)
    length = hi - lo
    layer = tl.where(total_nc > 0, total_h / tl.maximum(total_nc, 1).to(tl.float64), 0.0)
    layer_all = tl.where(length > 0, total_h / tl.maximum(length, 1).to(tl.float64), 0.0)
    tl.store(Layer_ptr + s, layer)
    tl.store(LayerAll_ptr + s, layer_all)


def entropy_triton(
    counts: torch.Tensor, observations: torch.Tensor, offsets: torch.Tensor, *, block_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the epilogue: ``(p_on, channel_entropy, layer_entropy, layer_entropy_all)``.

    Args:
        counts: int64 ``[T]`` ON counts of all sites, concatenated.
        observations: int64 ``[T]``.
        offsets: int64 ``[S + 1]`` site boundaries.
        block_size: channels per loop step (power of two).

    Returns:
        Four float64 tensors: ``[T]``, ``[T]``, ``[S]``, ``[S]``.

    Example:
        >>> entropy_triton(torch.tensor([1], device="cuda"), torch.tensor([2], device="cuda"),
        ...                torch.tensor([0, 1], device="cuda"))[2]  # doctest: +SKIP
        tensor([1.], device='cuda:0', dtype=torch.float64)
    """
    dev = counts.device
    counts = counts.contiguous()
    observations = observations.contiguous()
    offsets = offsets.contiguous()
    t = counts.numel()
    s = offsets.numel() - 1
    p = torch.empty(t, dtype=torch.float64, device=dev)
    h = torch.empty(t, dtype=torch.float64, device=dev)
    layer = torch.empty(s, dtype=torch.float64, device=dev)
    layer_all = torch.empty(s, dtype=torch.float64, device=dev)
    if s > 0:
        _entropy_kernel[(s,)](
            counts, observations, offsets, p, h, layer, layer_all, BLOCK_SIZE=block_size, num_warps=4
        )
    return p, h, layer, layer_all
