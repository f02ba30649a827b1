"""The CPU sign_count_ kernel's two loop families (AVX2 and plain) against the torch reference.

Every case runs twice, once with the AVX2 loops (where the CPU has AVX2) and once with the
plain loops forced by the test hook ``torch.ops.egp_fast._sign_count_vector_mode``: the counts
must equal the reference's exactly. The shapes reach every walk of the kernel (one plane at a
time, long and short planes; rows of small planes; channels-last rows; the strided copy), with
lengths that are not multiples of the 8- and 32-value vector steps, and views that start at
odd element offsets (unaligned loads).
"""

from __future__ import annotations

import pytest
import torch

from egp_fast import _ext
from egp_fast.ops import reference_sign_count_, sign_count_

pytestmark = pytest.mark.requires_ext

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _has_hook() -> bool:
    return _ext.HAS_CPP and hasattr(torch.ops.egp_fast, "_sign_count_vector_mode")


@pytest.fixture(params=["avx2", "plain"])
def loops(request):
    """Runs the test with the AVX2 loops on (skipped where the CPU lacks AVX2), then off."""
    if not _has_hook():
        pytest.skip("the loaded extension predates the _sign_count_vector_mode test hook")
    mode = torch.ops.egp_fast._sign_count_vector_mode
    on = mode(1 if request.param == "avx2" else 0)
    if request.param == "avx2" and not on:
        mode(1)
        pytest.skip("this CPU has no AVX2")
    assert on == (request.param == "avx2")
    yield request.param
    mode(1)


def _special(shape, dtype, gen, threshold=0.0) -> torch.Tensor:
    """randn with NaN (several payloads, both signs), +-0, +-inf, subnormals of the dtype and
    values at, just above and just below the threshold as the dtype rounds it."""
    n = 1
    for s in shape:
        n *= s
    z = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    info = torch.finfo(dtype)
    thr = torch.tensor(threshold, dtype=torch.float64).to(dtype)
    specials = torch.stack([
        torch.tensor(float("nan"), dtype=dtype), torch.tensor(-0.0, dtype=dtype),
        torch.tensor(0.0, dtype=dtype), torch.tensor(float("inf"), dtype=dtype),
        torch.tensor(float("-inf"), dtype=dtype), torch.tensor(info.smallest_normal, dtype=dtype),
        torch.tensor(info.smallest_normal / 4, dtype=dtype), torch.tensor(-info.smallest_normal / 4, dtype=dtype),
        thr, torch.nextafter(thr, torch.tensor(float("inf"), dtype=dtype)) if dtype in (torch.float32, torch.float64)
        else (thr.double() + abs(thr.double()) / 256 + 1e-3).to(dtype),
        torch.nextafter(thr, torch.tensor(float("-inf"), dtype=dtype)) if dtype in (torch.float32, torch.float64)
        else (thr.double() - abs(thr.double()) / 256 - 1e-3).to(dtype),
    ])
    r = torch.randint(0, 2 * specials.numel(), (n,), generator=gen)
    pick = r < specials.numel()
    z[pick] = specials[r[pick]]
    if dtype == torch.float32 and n >= 3:
        bits = z.view(torch.int32)  # NaNs with other payloads and the sign bit set
        bits[:3] = torch.tensor([0x7FC00001, 0x7F800001, -0x7FFFFFFF - 1 + 0x7FC00000], dtype=torch.int32)
    elif dtype in (torch.bfloat16, torch.float16) and n >= 2:
        bits = z.view(torch.int16)
        nan_bits = [0x7FC1, -0x8000 + 0x7F81] if dtype == torch.bfloat16 else [0x7E01, -0x8000 + 0x7C01]
        bits[:2] = torch.tensor(nan_bits, dtype=torch.int16)
    return z.reshape(shape)


def _check(z: torch.Tensor, channel_dim: int, threshold: float = 0.0) -> None:
    c = z.shape[channel_dim]
    start = torch.arange(c, dtype=torch.int64) * 3 + 5  # counts accumulate onto what is there
    got, want = start.clone(), start.clone()
    sign_count_(z, got, channel_dim, threshold, backend="cpp")
    reference_sign_count_(z, want, channel_dim, threshold)
    assert torch.equal(got, want), (z.dtype, tuple(z.shape), z.stride(), channel_dim, threshold)


# (name, shape, channel_dim, view): the walks of csrc/sign_count/sign_count_cpu.cpp.
LAYOUTS = [
    ("planes_64", (5, 6, 8, 8), 1, lambda t: t),  # 64-value planes: one plane at a time
    ("planes_odd", (3, 5, 7, 11), 1, lambda t: t),  # 77 values: 32-steps, 8-steps and a tail
    ("planes_8_few", (1, 700, 3, 3), 1, lambda t: t),  # 9-value planes, too few rows: vector + tail
    ("planes_short", (1, 70000, 1, 5), 1, lambda t: t),  # 5-value planes under the vector width
    ("rows_small_planes", (19, 13, 3, 5), 1, lambda t: t),  # rows of C*H*W counters
    ("rows_resnet_late", (9, 37, 2, 2), 1, lambda t: t),
    ("channels_last", (4, 19, 5, 7), 1, lambda t: t.contiguous(memory_format=torch.channels_last)),
    ("nlc", (3, 10, 37), -1, lambda t: t),
    ("nl_c_first", (3, 37, 41), 1, lambda t: t),  # 3-D, channel in the middle
    ("nc", (17, 45), 1, lambda t: t),
    ("nc_channel_first", (45, 17), 0, lambda t: t),
    ("vector", (67,), 0, lambda t: t),
    ("one_value", (1,), 0, lambda t: t),
    ("5d", (2, 3, 4, 5, 6), 1, lambda t: t),
    ("offset_view", (3, 9, 7, 9), 1, None),  # contiguous, starting one element into its storage
    ("sliced", (6, 10, 12), 2, lambda t: t[:, 1:8, 1::2]),  # strided: the copy fallback
    ("transposed", (9, 6, 21), 1, lambda t: t.transpose(0, 2)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x[0])
@pytest.mark.parametrize("threshold", [0.0, 0.1, -0.5])
def test_loops_match_reference(loops, dtype, layout, threshold):
    _, shape, channel_dim, view = layout
    gen = torch.Generator().manual_seed(3)
    if view is None:
        n = shape[0] * shape[1] * shape[2] * shape[3]
        z = _special((n + 1,), dtype, gen, threshold)[1:].view(shape)
        assert z.is_contiguous() and z.storage_offset() == 1
    else:
        z = view(_special(shape, dtype, gen, threshold))
    _check(z, channel_dim, threshold)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threshold", [-0.0, float("inf"), float("-inf"), float("nan"), 70000.0, 1e-42])
def test_edge_thresholds(loops, dtype, threshold):
    # inf/-inf/NaN thresholds, one over fp16's range (cast to inf) and one under fp32's normals.
    gen = torch.Generator().manual_seed(5)
    for shape, dim in (((4, 6, 9, 9), 1), ((5, 3, 2, 2), 1), ((7, 40), -1)):
        _check(_special(shape, dtype, gen, 0.0), dim, threshold)


def test_random_shapes(loops):
    """Shapes drawn at random (1-D to 4-D, every channel position, both memory formats)."""
    gen = torch.Generator().manual_seed(17)
    for _ in range(60):
        ndim = int(torch.randint(1, 5, (1,), generator=gen))
        shape = tuple(int(s) for s in torch.randint(1, 12 if ndim > 2 else 90, (ndim,), generator=gen))
        dim = int(torch.randint(-ndim, ndim, (1,), generator=gen))
        dtype = DTYPES[int(torch.randint(0, len(DTYPES), (1,), generator=gen))]
        z = _special(shape, dtype, gen)
        if ndim == 4 and bool(torch.randint(0, 2, (1,), generator=gen)):
            z = z.contiguous(memory_format=torch.channels_last)
        _check(z, dim, float(torch.randn(1, generator=gen)) if bool(torch.randint(0, 2, (1,), generator=gen)) else 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_resnet_activation_shapes(loops, dtype):
    """The shapes of resnet18's sites at 32x32 (batch cut to 8), two threads' worth of work."""
    gen = torch.Generator().manual_seed(23)
    for shape in ((8, 64, 16, 16), (8, 64, 8, 8), (8, 128, 4, 4), (8, 256, 2, 2), (8, 512, 1, 1)):
        _check(_special(shape, dtype, gen), 1)
        _check(_special(shape, dtype, gen).contiguous(memory_format=torch.channels_last), 1)


def test_both_loops_agree_on_a_large_input():
    """Over a tensor of several parallel tasks, the AVX2 and plain loops give the same counts."""
    if not _has_hook():
        pytest.skip("the loaded extension predates the _sign_count_vector_mode test hook")
    mode = torch.ops.egp_fast._sign_count_vector_mode
    gen = torch.Generator().manual_seed(29)
    z = _special((16, 64, 33, 33), torch.float32, gen)
    out = []
    try:
        for m in (0, 1):
            mode(m)
            out.append(sign_count_(z, torch.zeros(64, dtype=torch.int64), 1, backend="cpp"))
    finally:
        mode(1)
    assert torch.equal(out[0], out[1])
    assert torch.equal(out[0], reference_sign_count_(z, torch.zeros(64, dtype=torch.int64), 1))


def test_vector_mode_hook_reports_state():
    if not _has_hook():
        pytest.skip("the loaded extension predates the _sign_count_vector_mode test hook")
    mode = torch.ops.egp_fast._sign_count_vector_mode
    try:
        assert mode(0) is False
        assert mode(-1) is False  # a negative mode only reads the state
    finally:
        mode(1)
