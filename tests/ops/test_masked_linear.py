"""masked_linear: Triton kernels, the cuBLAS shortcut and the MaskedLinear module against
the torch reference (forward and both gradients)."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from egp_fast import ops
from egp_fast.errors import ConfigError
from egp_fast.masks.linear import MaskedLinear
from egp_fast.ops.masked_linear import (
    TileMapCache,
    build_tile_map,
    reference_masked_linear,
    reference_tile_occupancy,
)

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _dev() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _tile(device, dtype):
    from egp_fast.kernels.masked_linear import tile_shape

    return tile_shape(torch.device(device), dtype)


def _mask(shape, sparsity, device, zero_tiles=None, dtype=torch.float32):
    """Random mask at ``sparsity``; with ``zero_tiles`` also that fraction of whole tiles off."""
    n, k = shape
    if sparsity >= 1.0:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    m = torch.rand(shape, device=device) >= sparsity
    if zero_tiles:
        bn, bk = _tile(device, dtype)
        tn, tk = -(-n // bn), -(-k // bk)
        off = torch.rand(tn, tk, device=device) < zero_tiles
        off[0, 0] = True  # at least one whole zero tile, however few tiles there are
        m &= ~off.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    return m


def _problem(x_shape, n, sparsity, dtype, device, bias=True, zero_tiles=None, dirty=False):
    k = x_shape[-1]
    x = torch.randn(x_shape, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    m = _mask((n, k), sparsity, device, zero_tiles, dtype)
    if not dirty:
        w = w * m  # Pruner keeps pruned weights at exactly zero
    b = torch.randn(n, device=device).to(dtype) if bias else None
    return x, w, m, b


def _run(fn, x, w, m, b, dy):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True) if b is not None else None
    y = fn(x, w, m, b)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, (b.grad if b is not None else None)


def _compare(x, w, m, b, backend="triton", tol=None):
    tol = tol or TOL[x.dtype]
    dy = torch.randn(*x.shape[:-1], w.shape[0], device=x.device).to(x.dtype)
    got = _run(lambda *a: ops.masked_linear(*a, backend=backend), x, w, m, b, dy)
    ref = _run(reference_masked_linear, x, w, m, b, dy)
    for name, g, r in zip(("y", "dx", "dw", "db"), got, ref):
        if r is None:
            assert g is None, name
            continue
        assert g.dtype == r.dtype and g.shape == r.shape, name
        torch.testing.assert_close(
            g.float(), r.float(), atol=tol, rtol=tol, msg=lambda s, name=name: f"{name}: {s}"
        )
    # The weight gradient is exactly zero where the mask prunes.
    assert torch.all(got[2][~m] == 0)
    return got


triton_only = pytest.mark.requires_triton


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_forward_and_grads_match_reference(sparsity, dtype):
    x, w, m, b = _problem((37, 70), 50, sparsity, dtype, _dev())
    _compare(x, w, m, b)


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("zero_tiles", [0.5, 0.9])
def test_whole_zero_tiles(zero_tiles, dtype):
    x, w, m, b = _problem((29, 67), 53, 0.3, dtype, _dev(), zero_tiles=zero_tiles)
    tm = build_tile_map(w, m, *_tile(_dev(), dtype))
    assert tm.density < 1.0  # some tiles really are skipped
    _compare(x, w, m, b)


@triton_only
def test_leading_dims_no_bias_and_dirty_weight():
    # x [2, 3, 5, K]; weight nonzero under the mask (not enforced): the kernels apply it.
    x, w, m, b = _problem((2, 3, 5, 40), 33, 0.5, torch.float32, _dev(), bias=False, dirty=True)
    assert not build_tile_map(w, m, 16, 16).clean
    _compare(x, w, m, b)


@triton_only
def test_non_contiguous_inputs():
    x, w, m, b = _problem((20, 48), 40, 0.5, torch.float32, _dev())
    _compare(x.t().contiguous().t(), w.t().contiguous().t(), m, b)
    _compare(x[:, ::2], w[:, ::2], m[:, ::2], b)


@triton_only
def test_exact_tiles_and_tiny_shapes():
    bn, bk = _tile(_dev(), torch.float32)
    _compare(*_problem((bn, bk), bn, 0.5, torch.float32, _dev()))
    _compare(*_problem((1, 3), 1, 0.0, torch.float32, _dev()))
    _compare(*_problem((3, 1), 2, 0.5, torch.float32, _dev()))


@triton_only
@pytest.mark.parametrize("dirty", [False, True])
def test_dense_shortcut_matches_reference(monkeypatch, dirty):
    from egp_fast.ops import _triton_backend as tb

    monkeypatch.setattr(tb, "_use_dense", lambda tm, device: True)
    _compare(*_problem((19, 45), 30, 0.3, torch.float32, _dev(), dirty=dirty))


@triton_only
def test_only_x_needs_grad():
    x, w, m, b = _problem((9, 20), 12, 0.5, torch.float32, _dev())
    xg = x.clone().requires_grad_(True)
    y = ops.masked_linear(xg, w, m, b, backend="triton")
    y.sum().backward()
    torch.testing.assert_close(xg.grad, torch.ones(9, 12, device=x.device) @ (w * m))


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tile_occupancy_kernel_matches_torch(dtype):
    from egp_fast.kernels.masked_linear import tile_occupancy_triton

    w = torch.randn(45, 70, device=_dev()).to(dtype)
    m = _mask((45, 70), 0.6, _dev(), zero_tiles=0.5)
    w[~m & (torch.rand_like(w.float()) < 0.5)] = 0  # some dirty, some clean tiles
    w[:16, :16] = 0  # a kept-but-zero tile: occupancy 0, occ_mask may be 1
    for a, r in zip(tile_occupancy_triton(w, m, 16, 16), reference_tile_occupancy(w, m, 16, 16)):
        assert torch.equal(a, r)


def test_build_tile_map_lists():
    occ_w = torch.tensor([[1.0, 0, 0, 2], [0, 0, 0, 0], [0, 3, 0, 0]])
    m = occ_w != 0
    m[1, 2] = True  # kept but zero: no forward work, but a weight-gradient tile
    tm = build_tile_map(occ_w, m, 1, 1)
    assert tm.row_ptr.tolist() == [0, 2, 2, 3]
    assert tm.row_idx.tolist() == [0, 3, 1]
    assert tm.col_ptr.tolist() == [0, 1, 2, 2, 3]
    assert tm.col_idx.tolist() == [0, 2, 0]
    assert tm.grad_tiles.tolist() == [[0, 0], [0, 3], [1, 2], [2, 1]]
    assert tm.clean and tm.density == 3 / 12


def test_tile_map_cache_invalidation():
    cache = TileMapCache()
    w, m = torch.randn(8, 8), torch.rand(8, 8) > 0.5
    first = cache.get(w, m, 4, 4)
    assert cache.get(w, m, 4, 4) is first and cache.builds == 1
    m[0, 0] = not m[0, 0]  # in-place edit bumps the version
    assert cache.get(w, m, 4, 4) is not first and cache.builds == 2
    with torch.no_grad():
        w.mul_(2)
    cache.get(w, m, 4, 4)
    assert cache.builds == 3
    cache.get(w.clone(), m, 4, 4)  # another tensor object
    assert cache.builds == 4
    cache.get(w, m, 2, 4)  # another tile shape
    assert cache.builds == 5


def test_public_validation():
    w = torch.randn(3, 4)
    with pytest.raises(ConfigError, match="mask"):
        ops.masked_linear(torch.randn(2, 4), w, torch.ones(3, 4))
    with pytest.raises(ConfigError, match="features"):
        ops.masked_linear(torch.randn(2, 5), w, torch.ones(3, 4, dtype=torch.bool))


# ------------------------------------------------------------------------- the module


def _layer(dev=None):
    lin = nn.Linear(24, 10).to(dev or _dev())
    mask = torch.rand(10, 24, device=lin.weight.device) > 0.6
    with torch.no_grad():
        lin.weight.mul_(mask)
    return lin, mask


def test_from_linear_shares_parameters_and_matches():
    lin, mask = _layer()
    ml = MaskedLinear.from_linear(lin, mask)
    assert ml.weight is lin.weight and ml.bias is lin.bias
    assert torch.equal(ml.weight_mask, mask) and ml.weight_mask is not mask
    x = torch.randn(7, 24, device=lin.weight.device)
    torch.testing.assert_close(ml(x), reference_masked_linear(x, lin.weight, mask, lin.bias))
    back = ml.to_linear()
    assert type(back) is nn.Linear and back.weight is lin.weight and back.bias is lin.bias


def test_from_linear_defaults_and_errors():
    lin = nn.Linear(5, 3, bias=False)
    ml = MaskedLinear.from_linear(lin)
    assert ml.weight_mask.all() and ml.bias is None
    x = torch.randn(2, 5)
    torch.testing.assert_close(ml(x), lin(x))
    with pytest.raises(ConfigError, match="mask"):
        MaskedLinear.from_linear(lin, torch.ones(3, 5))
    with pytest.raises(ConfigError, match="nn.Linear"):
        MaskedLinear.from_linear(nn.Conv2d(1, 1, 1))


def test_state_dict_pickle_deepcopy():
    lin, mask = _layer("cpu")
    ml = MaskedLinear.from_linear(lin, mask)
    assert list(ml.state_dict()) == ["weight", "bias", "weight_mask"]
    x = torch.randn(4, 24)
    y = ml(x)
    for other in (copy.deepcopy(ml), pickle.loads(pickle.dumps(ml))):
        assert other.weight is not ml.weight
        torch.testing.assert_close(other(x), y)
    fresh = MaskedLinear(24, 10)
    fresh.load_state_dict(ml.state_dict())
    torch.testing.assert_close(fresh(x), y)
    buf = io.BytesIO()
    torch.save(ml.state_dict(), buf)
    buf.seek(0)
    assert set(torch.load(buf, weights_only=True)) == {"weight", "bias", "weight_mask"}


@triton_only
def test_module_triton_caches_tile_map_until_mask_changes():
    lin, mask = _layer()
    ml = MaskedLinear.from_linear(lin, mask, backend="triton")
    x = torch.randn(5, 24, device=lin.weight.device)
    with torch.no_grad():
        y1 = ml(x)
        ml(x)
    assert ml._tile_cache.builds == 1
    with torch.no_grad():
        ml.weight_mask[:, :8] = False
        y2 = ml(x)
    assert ml._tile_cache.builds == 2
    torch.testing.assert_close(y1, reference_masked_linear(x, lin.weight, mask, lin.bias))
    torch.testing.assert_close(y2, reference_masked_linear(x, lin.weight, ml.weight_mask, lin.bias))


@triton_only
def test_module_training_step_keeps_pruned_weights_zero():
    lin, mask = _layer()
    ml = MaskedLinear.from_linear(lin, mask, backend="triton")
    opt = torch.optim.SGD(ml.parameters(), lr=0.1)
    x = torch.randn(6, 24, device=lin.weight.device)
    for _ in range(2):
        opt.zero_grad()
        ml(x).square().mean().backward()
        assert torch.all(ml.weight.grad[~mask] == 0)
        opt.step()
    assert torch.all(ml.weight[~mask] == 0)
    assert ml._tile_cache.builds == 2  # the weight changed between the two steps


# ---------------------------------------------------------------------------- GPU only


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "sparsity,zero_tiles", [(0.0, None), (0.5, None), (0.9, None), (1.0, None), (0.5, 0.9)]
)
def test_gpu_matches_reference(sparsity, zero_tiles, dtype):
    x, w, m, b = _problem((4, 77, 520), 300, sparsity, dtype, "cuda", zero_tiles=zero_tiles)
    # Relative to the output scale: bf16/fp16 products over K=520 in fp32 accumulation.
    _compare(x, w, m, b)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_sparse_kernel_forced(monkeypatch, dtype):
    from egp_fast.ops import _triton_backend as tb

    monkeypatch.setattr(tb, "_use_dense", lambda tm, device: False)
    _compare(*_problem((300, 512), 384, 0.2, dtype, "cuda", dirty=True))
    _compare(*_problem((300, 512), 384, 0.0, dtype, "cuda"))
