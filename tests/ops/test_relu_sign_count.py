"""relu_sign_count: the ReLU with its ON count taken in the same read of the input.

The output must be bit for bit what ``torch.relu`` / ``torch.relu_`` return (values, -0.0,
+-inf, dtype, strides; NaN stays NaN, whose payload torch itself does not keep consistently
for 16-bit dtypes), and the counts what ``sign_count_`` at threshold 0 adds. Every case runs
with the AVX2 loops and with the plain loops, on every walk of the kernel (the layouts of the
sign_count tests: planes, rows, channels-last, odd lengths, offset and strided views).
"""

from __future__ import annotations

import pytest
import torch

from egp_fast.errors import BackendError, ConfigError
from egp_fast.ops import reference_relu_sign_count, reference_sign_count_, relu_sign_count

from _sign_cases import DTYPES, LAYOUTS, _special, loops, random_cases  # noqa: F401 (loops: a fixture)

_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}


def _same_relu(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    bits = _BITS[want.dtype]
    assert torch.equal(got.view(bits)[~nan], want.view(bits)[~nan])  # -0.0 and +0.0 differ here


def _make(layout, dtype, seed=3):
    _, shape, channel_dim, view = layout
    gen = torch.Generator().manual_seed(seed)
    if view is None:
        n = shape[0] * shape[1] * shape[2] * shape[3]
        return _special((n + 1,), dtype, gen)[1:].view(shape), channel_dim
    return view(_special(shape, dtype, gen)), channel_dim


@pytest.mark.requires_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x[0])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_matches_relu_and_sign_count(loops, dtype, layout, inplace):
    z, dim = _make(layout, dtype)
    twin, _ = _make(layout, dtype)  # the same values in the same kind of view (same seed)
    start = torch.arange(z.shape[dim], dtype=torch.int64) * 7 + 1  # counts accumulate onto what is there
    want_counts = reference_sign_count_(twin, start.clone(), dim, 0.0)
    want = torch.relu_(twin) if inplace else torch.relu(twin)
    got_counts = start.clone()
    got = relu_sign_count(z, got_counts, dim, inplace=inplace, backend="cpp")
    assert torch.equal(got_counts, want_counts)
    assert (got is z) == inplace
    _same_relu(got, want)


@pytest.mark.requires_ext
def test_input_is_left_untouched_out_of_place():
    gen = torch.Generator().manual_seed(5)
    z = _special((6, 9, 5, 5), torch.float32, gen)
    before = z.clone()
    relu_sign_count(z, torch.zeros(9, dtype=torch.int64), 1, backend="cpp")
    assert torch.equal(z.view(torch.int32), before.view(torch.int32))


@pytest.mark.requires_ext
@pytest.mark.parametrize("inplace", [False, True])
def test_cpp_and_reference_agree_on_random_shapes(inplace):
    for z, dim, _ in random_cases(19, 40):
        a, b = z.clone(memory_format=torch.preserve_format), z.clone(memory_format=torch.preserve_format)
        ca = torch.zeros(z.shape[dim], dtype=torch.int64)
        cb = torch.zeros(z.shape[dim], dtype=torch.int64)
        ya = relu_sign_count(a, ca, dim, inplace=inplace, backend="cpp")
        yb = reference_relu_sign_count(b, cb, dim, inplace)
        assert torch.equal(ca, cb), (shape, dim, dtype)
        _same_relu(ya, yb)


def test_reference_backend_and_integer_input():
    z = torch.tensor([[3, -2, 0], [-1, 5, 7]])
    c = torch.zeros(3, dtype=torch.int64)
    y = relu_sign_count(z, c, 1)  # integers: the reference serves every backend choice
    assert torch.equal(y, torch.relu(z)) and c.tolist() == [1, 1, 1]
    y = relu_sign_count(z.float(), c, 1, backend="torch")
    assert c.tolist() == [2, 2, 2] and torch.equal(y, torch.relu(z.float()))


def test_gradient_flows_through_the_reference():
    z = torch.randn(4, 3, requires_grad=True)
    c = torch.zeros(3, dtype=torch.int64)
    y = relu_sign_count(z, c, 1)
    y.sum().backward()
    assert torch.equal(z.grad, (z > 0).float()) and int(c.sum()) == int((z > 0).sum())


def test_empty_input():
    z = torch.randn(0, 4, 3)
    c = torch.zeros(4, dtype=torch.int64)
    y = relu_sign_count(z, c, 1)
    assert y.shape == z.shape and int(c.sum()) == 0


def test_bad_arguments_name_the_fix():
    z = torch.randn(2, 3)
    with pytest.raises(ConfigError, match=r"relu_sign_count: counts must have shape \[3\]"):
        relu_sign_count(z, torch.zeros(2, dtype=torch.int64), 1)
    with pytest.raises(ConfigError, match="channel_dim=2 is out of range"):
        relu_sign_count(z, torch.zeros(3, dtype=torch.int64), 2)
    with pytest.raises(ConfigError, match="inplace must be True or False"):
        relu_sign_count(z, torch.zeros(3, dtype=torch.int64), 1, inplace=1)
    with pytest.raises(BackendError, match="cannot run relu_sign_count"):
        relu_sign_count(z, torch.zeros(3, dtype=torch.int64), 1, backend="cuda")


@pytest.mark.requires_ext
def test_fake_kernels_trace_under_compile():
    """torch.compile sees the op through its fake implementation (no graph break)."""
    counts = torch.zeros(4, dtype=torch.int64)

    def f(x):
        return torch.ops.egp_fast.relu_sign_count(x * 2, counts, 1) + 1

    x = torch.randn(3, 4, 5)
    want_counts = reference_sign_count_(x * 2, torch.zeros(4, dtype=torch.int64), 1, 0.0)
    got = torch.compile(f, backend="eager", fullgraph=True)(x)
    assert torch.equal(got, torch.relu(x * 2) + 1) and torch.equal(counts, want_counts)
