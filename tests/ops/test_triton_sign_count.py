"""Triton sign_count against the torch reference: exact counts on every layout and edge value.

Runs under ``TRITON_INTERPRET=1`` on the CPU (tiny grids) and, marked ``requires_cuda``, on a
GPU with bf16 and larger shapes.
"""

from __future__ import annotations

import pytest
import torch

from egp_fast import ops
from egp_fast.errors import ConfigError

pytestmark = pytest.mark.requires_triton


def _kernels():
    from egp_fast.kernels import sign_count as k

    return k


def _dev() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check(z: torch.Tensor, channel_dim: int, threshold: float = 0.0, **launch) -> None:
    c = z.shape[channel_dim]
    ref = torch.full((c,), 7, dtype=torch.int64, device=z.device)
    got = ref.clone()
    ops.reference_sign_count_(z, ref, channel_dim, threshold)
    if launch:
        _kernels().sign_count_triton(z, got, channel_dim, threshold, **launch)
    else:
        ops.sign_count_(z, got, channel_dim, threshold, backend="triton")
    assert torch.equal(got, ref), (got - ref).abs().max()


def _values(shape, kind: str, dtype, device) -> torch.Tensor:
    if kind == "randn":
        return torch.randn(shape, device=device).to(dtype)
    if kind == "pos":
        return (torch.rand(shape, device=device) + 0.1).to(dtype)
    if kind == "neg":
        return (-torch.rand(shape, device=device) - 0.1).to(dtype)
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype, device=device)
    if kind == "negzero":
        return torch.full(shape, -0.0, dtype=dtype, device=device)
    if kind == "mixed":
        # randn with NaN, -0.0, 0.0, +-inf and the smallest subnormals sprinkled in.
        z = torch.randn(shape, device=device).to(dtype).reshape(-1)
        specials = torch.tensor(
            [float("nan"), -0.0, 0.0, float("inf"), float("-inf"), 1e-45, -1e-45], device=device
        ).to(dtype)
        idx = torch.randperm(z.numel(), device=device)[: max(1, z.numel() // 3)]
        z[idx] = specials[torch.arange(idx.numel(), device=device) % specials.numel()]
        return z.reshape(shape)
    raise AssertionError(kind)


# (name, shape, channel_dim, transform) -- each layout the measurement pass meets.
LAYOUTS = [
    ("nchw", (3, 5, 7, 9), 1, None),
    ("nchw_c1", (4, 1, 6, 5), 1, None),
    ("nchw_c3_hw1", (11, 3, 1, 1), 1, None),
    ("channels_last", (3, 6, 5, 7), 1, "channels_last"),
    ("channels_last_c3", (5, 3, 4, 3), 1, "channels_last"),
    ("nlc", (4, 13, 10), -1, None),
    ("nhwc", (2, 5, 3, 7), -1, None),
    ("nc", (37, 6), 1, None),
    ("c_only", (29,), 0, None),
    ("transposed", (4, 6, 9), 1, "transpose"),
    ("sliced", (4, 6, 10, 9), 1, "slice"),
    ("expanded", (1, 6, 1, 9), 1, "expand"),
]


def _layout(shape, transform, dtype, kind, device):
    if transform == "transpose":
        z = _values((shape[2], shape[1], shape[0]), kind, dtype, device).transpose(0, 2)
    elif transform == "slice":
        z = _values(shape, kind, dtype, device)[:, :, 1::3, ::2]
    elif transform == "expand":
        z = _values(shape, kind, dtype, device).expand(3, -1, 4, -1)
    else:
        z = _values(shape, kind, dtype, device)
        if transform == "channels_last":
            z = z.contiguous(memory_format=torch.channels_last)
    return z


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name,shape,channel_dim,transform", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_layouts_match_reference(name, shape, channel_dim, transform, dtype):
    z = _layout(shape, transform, dtype, "mixed", _dev())
    _check(z, channel_dim)


@pytest.mark.parametrize("kind", ["pos", "neg", "zeros", "negzero", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_edge_values(kind, dtype):
    z = _values((3, 5, 4, 3), kind, dtype, _dev())
    _check(z, 1)
    _check(z.contiguous(memory_format=torch.channels_last), 1)
    _check(z.reshape(3, 12, 5), -1)


def test_all_positive_counts_every_observation():
    z = _values((3, 4, 5), "pos", torch.float32, _dev())
    counts = torch.zeros(4, dtype=torch.int64, device=z.device)
    ops.sign_count_(z, counts, 1, backend="triton")
    assert counts.tolist() == [15] * 4


def test_nan_counts_as_off():
    z = torch.full((2, 3, 4), float("nan"), device=_dev())
    counts = torch.zeros(3, dtype=torch.int64, device=z.device)
    ops.sign_count_(z, counts, 1, backend="triton")
    assert counts.tolist() == [0, 0, 0]


@pytest.mark.parametrize("threshold", [-0.5, 0.25, 1.0, 0.09997, float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_threshold(threshold, dtype):
    z = _values((3, 5, 4, 3), "mixed", dtype, _dev())
    # Values exactly at the threshold must not count (strict >).
    z[0, :, 0, 0] = torch.tensor(threshold).to(dtype)
    _check(z, 1, threshold)
    _check(z.permute(0, 2, 3, 1), -1, threshold)


@pytest.mark.parametrize(
    "launch",
    [
        {"block_c": 2, "block_p": 16, "programs": 5},  # many chunks, ragged last chunk
        {"block_c": 1, "block_p": 16, "programs": 64},  # one chunk per program
        {"block_c": 8, "block_p": 32, "programs": 1},  # a single program loops over all
        {"block_c": 2, "block_p": 16, "programs": 3, "force_wide": True},  # 64-bit offsets
    ],
)
@pytest.mark.parametrize("transform", [None, "channels_last"])
def test_block_and_slice_overrides(launch, transform):
    # N*HW = 3*49 is no multiple of any block; C = 5 is no multiple of block_c.
    z = _layout((3, 5, 7, 7), transform, torch.float32, "randn", _dev())
    _check(z, 1, **launch)


def test_accumulates_into_strided_counts():
    z = _values((4, 3, 5, 5), "randn", torch.float32, _dev())
    buf = torch.zeros(6, dtype=torch.int64, device=z.device)
    view = buf[::2]
    ops.sign_count_(z, view, 1, backend="triton")
    ops.sign_count_(z, view, 1, backend="triton")
    expected = (z > 0).sum(dim=(0, 2, 3)) * 2
    assert torch.equal(buf[::2], expected)
    assert torch.equal(buf[1::2], torch.zeros(3, dtype=torch.int64, device=z.device))


def test_plan_layout_merges_or_falls_back():
    k = _kernels()
    z = torch.empty(2, 3, 4, 5)
    assert k.plan_layout(z, 1) == (2, 3, 20, 60, 20, 1)
    cl = z.contiguous(memory_format=torch.channels_last)
    assert k.plan_layout(cl, 1) == (1, 3, 40, 0, 1, 3)
    # Slicing two separate axes leaves three strided runs: the documented copy fallback.
    assert k.plan_layout(torch.empty(2, 3, 8, 10)[:, :, ::2, ::3], 1) is None
    _check(torch.randn(2, 3, 8, 10, device=_dev())[:, :, ::2, ::3], 1)


def test_other_dtypes_use_reference():
    z = torch.randint(-3, 4, (3, 4, 5), device=_dev())
    _check(z, 1, 0.5)
    _check(torch.randn(3, 4, 5, dtype=torch.float64, device=_dev()), 1)


def test_empty_tensor_is_a_no_op():
    counts = torch.ones(4, dtype=torch.int64, device=_dev())
    ops.sign_count_(torch.empty(0, 4, 3, device=_dev()), counts, 1, backend="triton")
    assert counts.tolist() == [1, 1, 1, 1]


def test_wrong_counts_dtype_raises():
    with pytest.raises(ConfigError, match="int64"):
        ops.sign_count_(torch.randn(2, 3, device=_dev()), torch.zeros(3, device=_dev()), 1, backend="triton")


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,channel_dim,transform",
    [
        ((16, 64, 28, 28), 1, None),
        ((16, 64, 28, 28), 1, "channels_last"),
        ((8, 3, 57, 31), 1, None),
        ((7, 1, 13, 13), 1, None),
        ((32, 197, 384), -1, None),
        ((8, 14, 14, 96), -1, None),
        ((512, 3), 1, None),
        ((4, 6, 10, 9), 1, "slice"),
    ],
)
def test_gpu_matches_reference(shape, channel_dim, transform, dtype):
    z = _layout(shape, transform, dtype, "mixed", "cuda")
    _check(z, channel_dim)
    _check(z, channel_dim, 0.5)


@pytest.mark.requires_cuda
def test_gpu_is_deterministic_and_sync_free():
    z = torch.randn(64, 32, 56, 56, device="cuda", dtype=torch.bfloat16)
    counts = torch.zeros(32, dtype=torch.int64, device="cuda")
    for _ in range(3):
        ops.sign_count_(z, counts, 1, backend="triton")
    ref = torch.zeros_like(counts)
    ops.reference_sign_count_(z, ref, 1)
    assert torch.equal(counts, ref * 3)
