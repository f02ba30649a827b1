"""Registers the compiled extension's kernels as the ``"cpp"`` and ``"cuda"`` backends.

The public wrappers in :mod:`egp_fast.ops` validate arguments before dispatch, so the
functions here receive well-formed input; cases a kernel does not cover (integer activations,
float dtypes other than fp16/bf16/fp32/fp64, fp64 on the GPU) are sent to the torch reference.
Importing this module raises ImportError when ``egp_fast._C`` is absent, which
:mod:`egp_fast.ops` treats as "backend not installed".

Fake (meta) implementations are registered here too, so ``torch.compile`` and
``torch.library.opcheck`` can trace ``torch.ops.egp_fast.*``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from egp_fast import _ext
from egp_fast.ops._dispatch import register
from egp_fast.ops.select import reference_global_smallest, reference_select_smallest
from egp_fast.ops.select_counts import reference_global_smallest_counts
from egp_fast.ops.sign_count import reference_relu_sign_count, reference_sign_count_

if not _ext.HAS_CPP:
    raise ImportError(f"egp_fast._C is not loaded: {_ext.LOAD_ERROR}")

_OPS = torch.ops.egp_fast

_CPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# The CUDA select works on 32-bit keys; fp64 weights go to the reference there.
_CUDA_SELECT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.register_fake("egp_fast::select_smallest")
def _select_smallest_fake(weights, masks, counts):
    return [torch.empty_like(m, memory_format=torch.contiguous_format) for m in masks]


@torch.library.register_fake("egp_fast::global_smallest")
def _global_smallest_fake(weights, masks, count):
    return [torch.empty_like(m, memory_format=torch.contiguous_format) for m in masks]


if hasattr(_OPS, "global_smallest_counts"):  # an extension built before this op has no schema for it

    @torch.library.register_fake("egp_fast::global_smallest_counts")
    def _global_smallest_counts_fake(weights, masks, count):
        ctx = torch.library.get_ctx()
        return [ctx.new_dynamic_size() for _ in masks]


@torch.library.register_fake("egp_fast::sign_count_")
def _sign_count_fake(z, counts, channel_dim, threshold):
    return None


if hasattr(_OPS, "zero_pruned_"):  # an extension built before this op has no schema for it

    @torch.library.register_fake("egp_fast::zero_pruned_")
    def _zero_pruned_fake(t, pruned):
        return None


def _all_in(weights: Sequence[torch.Tensor], dtypes: tuple[torch.dtype, ...]) -> bool:
    return all(w.dtype in dtypes for w in weights)


def _detached(weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [w.detach() for w in weights]


@register("select_smallest", "cpp")
def select_smallest_cpp(weights, masks, counts):
    """C++ select, one call for all layers: a sampled one-pass path for fp32, fp16 and bf16
    layers of 2**15+ entries, radix select for the rest (see csrc/select/select_cpu.cpp)."""
    if not _all_in(weights, _CPU_DTYPES):
        return reference_select_smallest(weights, masks, counts)
    return list(_OPS.select_smallest(_detached(weights), list(masks), [int(c) for c in counts]))


@register("global_smallest", "cpp")
def global_smallest_cpp(weights, masks, count):
    """C++ select with one budget across layers, without concatenating them."""
    if not _all_in(weights, _CPU_DTYPES):
        return reference_global_smallest(weights, masks, count)
    return list(_OPS.global_smallest(_detached(weights), list(masks), int(count)))


if hasattr(_OPS, "global_smallest_counts"):

    @register("global_smallest_counts", "cpp")
    def global_smallest_counts_cpp(weights, masks, count):
        """C++ global select that only counts: per layer, the entries it would prune (no masks)."""
        if not _all_in(weights, _CPU_DTYPES):
            return reference_global_smallest_counts(weights, masks, count)
        return list(_OPS.global_smallest_counts(_detached(weights), list(masks), int(count)))


# The op's overload, bound once: a call through it skips the overload lookup of
# ``torch.ops.egp_fast.sign_count_`` (measurement calls it for every site of every batch).
_SIGN_COUNT = _OPS.sign_count_.default


@register("sign_count", "cpp")
def sign_count_cpp(z, counts, channel_dim, threshold=0.0):
    """C++/OpenMP per-channel ON counts, in place (see csrc/sign_count/sign_count_cpu.cpp)."""
    if z.dtype not in _CPU_DTYPES:
        return reference_sign_count_(z, counts, channel_dim, threshold)
    _SIGN_COUNT(z.detach() if z.requires_grad else z, counts, int(channel_dim), float(threshold))
    return counts


if hasattr(_OPS, "relu_sign_count"):  # an extension built before this op has no schema for it

    @torch.library.register_fake("egp_fast::relu_sign_count")
    def _relu_sign_count_fake(z, counts, channel_dim):
        return torch.empty_like(z)

    @torch.library.register_fake("egp_fast::relu_sign_count_")
    def _relu_sign_count_inplace_fake(z, counts, channel_dim):
        return z

    _RELU_SIGN_COUNT = (_OPS.relu_sign_count.default, _OPS.relu_sign_count_.default)

    @register("relu_sign_count", "cpp")
    def relu_sign_count_cpp(z, counts, channel_dim, inplace=False):
        """C++ ReLU with the count taken in the same read of z (see csrc/sign_count/sign_count_cpu.cpp)."""
        if z.dtype not in _CPU_DTYPES:
            return reference_relu_sign_count(z, counts, channel_dim, inplace)
        return _RELU_SIGN_COUNT[bool(inplace)](z, counts, int(channel_dim))


if _ext.HAS_CUDA:

    @register("select_smallest", "cuda")
    def select_smallest_cuda(weights, masks, counts):
        """CUDA multi-block radix select, all layers in one set of launches."""
        if not _all_in(weights, _CUDA_SELECT_DTYPES):
            return reference_select_smallest(weights, masks, counts)
        return list(_OPS.select_smallest(_detached(weights), list(masks), [int(c) for c in counts]))

    @register("global_smallest", "cuda")
    def global_smallest_cuda(weights, masks, count):
        """CUDA multi-block radix select with one budget across layers."""
        if not _all_in(weights, _CUDA_SELECT_DTYPES):
            return reference_global_smallest(weights, masks, count)
        return list(_OPS.global_smallest(_detached(weights), list(masks), int(count)))

    @register("sign_count", "cuda")
    def sign_count_cuda(z, counts, channel_dim, threshold=0.0):
        """CUDA per-channel ON counts, in place, one read of z."""
        if z.dtype not in _CPU_DTYPES:
            return reference_sign_count_(z, counts, channel_dim, threshold)
        _OPS.sign_count_(z.detach(), counts, int(channel_dim), float(threshold))
        return counts
