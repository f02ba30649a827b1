"""Property-based tests: every op and every backend available here against the torch reference.

Random shapes (empty and size-1 dims included), dtypes, strides (transposed, channels-last,
expanded, sliced), and values drawn from a small pool so that ties, ±0, ±inf and NaN are
common. Exact ops (sign_count, select) must agree bit for bit; entropy and masked_linear
within float tolerance. The reference itself is checked against a brute-force definition.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egp_fast import ops
from egp_fast.ops import (
    reference_entropy,
    reference_global_smallest,
    reference_masked_linear,
    reference_select_smallest,
    reference_sign_count_,
)
from egp_fast.ops._dispatch import _IMPLS, triton_interpret

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

# Values that make ties, signed zeros, infinities and NaN frequent.
POOL = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0, 6.0, 5.9375, 0.1, -0.1, 1e-3,
        math.inf, -math.inf, math.nan, 3.0, -3.0, 65504.0, 1e-8, 0.3, -0.7, 1 / 3]
# Thresholds not representable in fp16/bf16 (rounded up or down) next to equal values in POOL.
THRESHOLDS = [0.0, 6.0, -0.5, 0.1, -0.1, 0.3, -0.7, 1 / 3, 1.0, -1.0]


def _backends(op: str) -> list[str]:
    have = _IMPLS.get(op, {})
    out = [b for b in ("cpp",) if b in have]
    if "triton" in have and triton_interpret():
        out.append("triton")
    return out


def _values(draw, n: int) -> list[float]:
    return draw(st.lists(st.sampled_from(POOL), min_size=n, max_size=n))


@st.composite
def layouts(draw, max_dims: int = 4, max_side: int = 5, dtypes=None):
    """A tensor with a random shape, dtype and memory layout (values from POOL)."""
    dims = draw(st.integers(1, max_dims))
    shape = draw(st.lists(st.integers(0, max_side), min_size=dims, max_size=dims))
    dtype = draw(st.sampled_from(dtypes or [torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    layout = draw(st.sampled_from(["contiguous", "permuted", "expanded", "sliced"]))
    n = math.prod(shape)
    base = torch.tensor(_values(draw, n), dtype=torch.float64).reshape(shape).to(dtype)
    if layout == "permuted" and dims > 1:
        perm = draw(st.permutations(range(dims)))
        # Same logical tensor, different strides (channels-last is one such permutation).
        z = base.permute(*perm).contiguous().permute(*[perm.index(i) for i in range(dims)])
    elif layout == "expanded":
        d = draw(st.integers(0, dims - 1))
        one = base.narrow(d, 0, min(1, shape[d]))
        z = one.expand(*shape) if shape[d] > 0 else base
    elif layout == "sliced":
        d = draw(st.integers(0, dims - 1))
        # Every other row of a tensor with each row doubled: same values, stride x2.
        z = base.repeat_interleave(2, dim=d)[(slice(None),) * d + (slice(None, None, 2),)]
    else:
        z = base
    assert tuple(z.shape) == tuple(shape)
    return z


def test_layouts_strategy_really_makes_non_contiguous_tensors():
    # A strategy that only ever makes contiguous tensors would make the stride tests vacuous.
    seen = set()

    @settings(max_examples=60, **SETTINGS)
    @given(layouts())
    def collect(z):
        if z.numel() > 1:
            seen.add(z.is_contiguous())

    collect()
    assert seen == {True, False}


# --------------------------------------------------------------------------------------------
# sign_count_


@st.composite
def sign_count_cases(draw, dtypes=None, max_side=5):
    z = draw(layouts(dtypes=dtypes, max_side=max_side))
    cdim = draw(st.integers(-z.dim(), z.dim() - 1))
    start = draw(st.integers(0, 3))
    counts = torch.full((z.shape[cdim],), start, dtype=torch.int64)
    return z, counts, cdim, draw(st.sampled_from(THRESHOLDS))


@settings(max_examples=60, **SETTINGS)
@given(sign_count_cases())
def test_reference_sign_count_matches_definition(case):
    z, counts, cdim, t = case
    got = reference_sign_count_(z, counts.clone(), cdim, t)
    d = cdim % z.dim()
    zz = z.movedim(d, 0).reshape(z.shape[d], math.prod(z.shape) // max(z.shape[d], 1)).double()
    # torch compares a low-precision tensor with the threshold rounded to the tensor's dtype.
    tt = torch.tensor(t, dtype=z.dtype).double()
    want = counts + (zz > tt).sum(1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", _backends("sign_count"))
def test_sign_count_backend_matches_reference(backend):
    dtypes = [torch.float32, torch.float64, torch.float16] + ([] if backend == "triton" else [torch.bfloat16])

    @settings(max_examples=40 if backend == "triton" else 60, **SETTINGS)
    @given(sign_count_cases(dtypes=dtypes, max_side=4 if backend == "triton" else 5))
    def check(case):
        z, counts, cdim, t = case
        want = reference_sign_count_(z, counts.clone(), cdim, t)
        got = ops.sign_count_(z, counts.clone(), cdim, t, backend=backend)
        assert torch.equal(got, want), (backend, z.dtype, tuple(z.shape), z.stride(), cdim, t)

    check()


# --------------------------------------------------------------------------------------------
# select_smallest / global_smallest


@st.composite
def select_cases(draw, max_layers: int = 3, max_side: int = 6, dtypes=None):
    n = draw(st.integers(1, max_layers))
    weights, masks, counts = [], [], []
    for _ in range(n):
        w = draw(layouts(max_dims=3, max_side=max_side,
                         dtypes=dtypes or [torch.float32, torch.float64, torch.float16, torch.bfloat16]))
        m = torch.tensor(draw(st.lists(st.booleans(), min_size=w.numel(), max_size=w.numel())),
                         dtype=torch.bool).reshape(w.shape)
        if draw(st.booleans()) and w.dim() > 1:
            m = m.transpose(0, -1).contiguous().transpose(0, -1)  # non-contiguous mask
        weights.append(w)
        masks.append(m)
        counts.append(draw(st.integers(0, int(m.sum()))))
    return weights, masks, counts


def _rank_key(v: float, i: int) -> tuple:
    # The documented order: |w| ascending, -0 == 0, NaN after +inf, ties by index.
    return (1, 0.0, i) if math.isnan(v) else (0, abs(v), i)


def _brute_select(w: torch.Tensor, m: torch.Tensor, k: int) -> torch.Tensor:
    vals = w.detach().double().reshape(-1).tolist()
    kept = [i for i, b in enumerate(m.reshape(-1).tolist()) if b]
    chosen = sorted(kept, key=lambda i: _rank_key(vals[i], i))[:k]
    out = m.clone().reshape(-1)
    out[chosen] = False
    return out.reshape(m.shape)


@settings(max_examples=60, **SETTINGS)
@given(select_cases())
def test_reference_select_matches_brute_force(case):
    weights, masks, counts = case
    before = [m.clone() for m in masks]
    got = reference_select_smallest(weights, masks, counts)
    for w, m, k, g, b in zip(weights, masks, counts, got, before):
        assert torch.equal(m, b), "the input mask was modified"
        assert int(m.sum()) - int(g.sum()) == k  # exactly k
        assert not bool((g & ~m).any())  # never revives a pruned weight
        assert torch.equal(g, _brute_select(w, m, k))


@settings(max_examples=60, **SETTINGS)
@given(select_cases())
def test_reference_global_matches_brute_force(case):
    weights, masks, _ = case
    total = sum(int(m.sum()) for m in masks)
    k = total // 2
    got = reference_global_smallest(weights, masks, k)
    entries = []
    pos = 0
    for layer, (w, m) in enumerate(zip(weights, masks)):
        vals = w.detach().double().reshape(-1).tolist()
        for i, b in enumerate(m.reshape(-1).tolist()):
            if b:
                entries.append((_rank_key(vals[i], pos + i), layer, i))
        pos += w.numel()
    want = [m.clone().reshape(-1) for m in masks]
    for _, layer, i in sorted(entries)[:k]:
        want[layer][i] = False
    for g, wnt, m in zip(got, want, masks):
        assert torch.equal(g, wnt.reshape(m.shape))


@pytest.mark.parametrize("backend", _backends("select_smallest"))
@settings(max_examples=60, **SETTINGS)
@given(case=select_cases())
def test_select_backend_matches_reference(backend, case):
    weights, masks, counts = case
    want = reference_select_smallest(weights, masks, counts)
    got = ops.select_smallest(weights, masks, counts, backend=backend)
    for g, w in zip(got, want):
        assert g.dtype == torch.bool and g.shape == w.shape
        assert torch.equal(g, w), backend


@pytest.mark.parametrize("backend", _backends("global_smallest"))
@settings(max_examples=60, **SETTINGS)
@given(case=select_cases(), frac=st.floats(0, 1))
def test_global_backend_matches_reference(backend, case, frac):
    weights, masks, _ = case
    k = int(frac * sum(int(m.sum()) for m in masks))
    want = reference_global_smallest(weights, masks, k)
    got = ops.global_smallest(weights, masks, k, backend=backend)
    for g, w in zip(got, want):
        assert torch.equal(g, w), backend


@pytest.mark.parametrize("backend", ["torch"] + _backends("select_smallest"))
def test_select_large_ties_across_radix_buckets(backend):
    # Many equal magnitudes spread over a big layer: a radix select must stop exactly at k
    # inside one bucket and take the lowest indices.
    g = torch.Generator().manual_seed(1)
    w = torch.randint(-3, 4, (50_003,), generator=g).float() * 0.25
    w[::7] = -0.0
    m = torch.rand(50_003, generator=g) > 0.1
    k = int(m.sum()) // 3
    got = ops.select_smallest([w], [m], [k], backend=backend)[0]
    assert torch.equal(got, _brute_select(w, m, k))


# --------------------------------------------------------------------------------------------
# entropy


@st.composite
def entropy_cases(draw, max_sites: int = 5, max_channels: int = 6):
    sizes = draw(st.lists(st.integers(0, max_channels), min_size=0, max_size=max_sites))
    t = sum(sizes)
    obs = draw(st.lists(st.sampled_from([0, 1, 2, 3, 7, 1000, 2**40]), min_size=t, max_size=t))
    counts = [draw(st.sampled_from([0, o, o // 2, max(o - 1, 0), min(1, o)])) for o in obs]
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    as64 = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    return as64(counts), as64(obs), as64(offsets)


@settings(max_examples=60, **SETTINGS)
@given(entropy_cases())
def test_reference_entropy_properties(case):
    counts, obs, offsets = case
    out = reference_entropy(counts, obs, offsets)
    assert bool(((out.channel_entropy >= 0) & (out.channel_entropy <= 1)).all())
    assert bool(torch.isfinite(out.layer_entropy).all()) and bool(torch.isfinite(out.layer_entropy_all).all())
    const = (counts == 0) | (counts == obs)
    assert bool((out.channel_entropy[const] == 0).all())  # H(0) = H(1) = 0 exactly
    for s in range(offsets.numel() - 1):
        lo, hi = int(offsets[s]), int(offsets[s + 1])
        h, c = out.channel_entropy[lo:hi], const[lo:hi]
        want = float(h[~c].mean()) if bool((~c).any()) else 0.0
        assert out.layer_entropy[s].item() == pytest.approx(want, abs=1e-12)
        # entropy_all <= entropy: constant channels only pull the plain mean down
        assert out.layer_entropy_all[s].item() <= out.layer_entropy[s].item() + 1e-12


@pytest.mark.parametrize("backend", _backends("entropy"))
@settings(max_examples=30, **SETTINGS)
@given(case=entropy_cases())
def test_entropy_backend_matches_reference(backend, case):
    counts, obs, offsets = case
    want = reference_entropy(counts, obs, offsets)
    got = ops.entropy(counts, obs, offsets, backend=backend)
    for name, g, w in zip(want._fields, got, want):
        assert g.dtype == torch.float64 and g.shape == w.shape, name
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9, msg=lambda s, n=name: f"{n}: {s}")
        # constant channels / all-constant layers must be exactly 0, not 1e-17
        if name == "channel_entropy":
            const = (counts == 0) | (counts == obs)
            assert bool((g[const] == 0).all())


# --------------------------------------------------------------------------------------------
# masked_linear


@st.composite
def masked_linear_cases(draw):
    n_out = draw(st.integers(1, 9))
    n_in = draw(st.integers(1, 9))
    lead = draw(st.lists(st.integers(0, 3), min_size=0, max_size=2))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(*lead, n_in, generator=g)
    w = torch.randn(n_out, n_in, generator=g)
    density = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    m = torch.rand(n_out, n_in, generator=g) < density
    if draw(st.booleans()):
        w = w * m  # "clean": pruned entries already zero
    bias = torch.randn(n_out, generator=g) if draw(st.booleans()) else None
    if draw(st.booleans()) and x.dim() >= 2:
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    return x, w, m, bias


@pytest.mark.parametrize("backend", _backends("masked_linear"))
@settings(max_examples=25, **SETTINGS)
@given(case=masked_linear_cases())
def test_masked_linear_backend_matches_reference(backend, case):
    x, w, m, bias = case
    want = reference_masked_linear(x, w, m, bias)
    got = ops.masked_linear(x, w, m, bias, backend=backend)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
