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

from _sign_cases import DTYPES, LAYOUTS, _has_hook, _special, loops, random_cases  # noqa: F401 (loops: a fixture)
from egp_fast.ops import reference_sign_count_, sign_count_

pytestmark = pytest.mark.requires_ext


def _check(z: torch.Tensor, channel_dim: int, threshold: float = 0.0) -> None:
    c = z.shape[channel_dim]
    start = torch.arange(c, dtype=torch.int64) * 3 + 5  # counts accumulate onto what is there
    got, want = start.clone(), start.clone()
    sign_count_(z, got, channel_dim, threshold, backend="cpp")
    reference_sign_count_(z, want, channel_dim, threshold)
    assert torch.equal(got, want), (z.dtype, tuple(z.shape), z.stride(), channel_dim, threshold)


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
    for z, dim, gen in random_cases(17, 60):
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
