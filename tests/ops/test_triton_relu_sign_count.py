"""Triton relu_sign_count against torch.relu plus the reference count.

Runs under ``TRITON_INTERPRET=1`` on the CPU (tiny grids; the interpreter has no bf16, so bf16
runs on a GPU only) and on a GPU where one is present. The output must be bit for bit
``torch.relu``'s (NaN: NaN), in place or not, on every layout the measurement pass meets,
including the views the kernel does not fuse (counted, then ``torch.relu``).
"""

from __future__ import annotations

import pytest
import torch

from egp_fast import ops

from test_triton_sign_count import LAYOUTS, _dev, _layout

pytestmark = pytest.mark.requires_triton

_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _dtypes():
    return [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype and got.stride() == want.stride()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    bits = _BITS[want.dtype]
    assert torch.equal(got.contiguous().view(bits)[~nan.contiguous()], want.contiguous().view(bits)[~nan.contiguous()])


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("dtype", _dtypes(), ids=str)
@pytest.mark.parametrize("name,shape,channel_dim,transform", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_matches_relu_and_reference_count(name, shape, channel_dim, transform, dtype, inplace):
    if inplace and transform == "expand":
        pytest.skip("torch.relu_ refuses an expanded tensor too (several elements share memory)")
    torch.manual_seed(0)
    z = _layout(shape, transform, dtype, "mixed", _dev())
    torch.manual_seed(0)
    twin = _layout(shape, transform, dtype, "mixed", _dev())  # the same values in the same view
    c = z.shape[channel_dim]
    want_counts = ops.reference_sign_count_(twin, torch.full((c,), 3, dtype=torch.int64, device=z.device),
                                            channel_dim, 0.0)
    want = torch.relu_(twin) if inplace else torch.relu(twin)
    got_counts = torch.full((c,), 3, dtype=torch.int64, device=z.device)
    got = ops.relu_sign_count(z, got_counts, channel_dim, inplace=inplace, backend="triton")
    assert torch.equal(got_counts, want_counts)
    assert (got is z) == inplace
    _same(got, want)


def test_fused_launch_writes_the_output_itself():
    """The kernel's own output path (out=): relu written by the counting launch itself."""
    from egp_fast.kernels import sign_count as k

    z = torch.randn(3, 6, 5, 7, device=_dev())
    out = torch.full_like(z, 7.0)
    counts = torch.zeros(6, dtype=torch.int64, device=z.device)
    k.sign_count_triton(z, counts, 1, 0.0, out=out)
    assert torch.equal(out, torch.relu(z))
    assert torch.equal(counts, ops.reference_sign_count_(z, torch.zeros_like(counts), 1, 0.0))


def test_measurement_on_the_triton_backend_counts_like_the_reference():
    import egp_fast

    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.ReLU(inplace=True), torch.nn.Conv2d(5, 4, 1),
                              torch.nn.ReLU()).to(_dev())
    data = [torch.randn(2, 3, 6, 6, device=_dev()) for _ in range(2)]
    a = egp_fast.measure_entropy(net, data, progress=False, backend="triton")
    b = egp_fast.measure_entropy(net, data, progress=False, backend="torch")
    assert all(torch.equal(a.sites[n].on_counts, b.sites[n].on_counts) for n in b.sites)
