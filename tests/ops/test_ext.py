"""The compiled extension egp_fast._C against the torch references: exact equality everywhere.

CPU kernels run here; the same tests run on a GPU (``requires_cuda``) against the CUDA kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import egp_fast
from egp_fast import _ext
from egp_fast.ops import (
    global_smallest,
    reference_global_smallest,
    reference_select_smallest,
    reference_sign_count_,
    select_smallest,
    sign_count_,
)

pytestmark = pytest.mark.requires_ext

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.requires_cuda),
]
BACKEND = {"cpu": "cpp", "cuda": "cuda"}
SELECT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# Big enough to span several 64K-element chunks of the CPU kernel (tie ranks across chunks) and
# to take the "big layer" path (>= 4 chunks).
BIG = 300_007


def _values(kind: str, n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if kind == "random":
        x = torch.randn(n, generator=gen, dtype=torch.float64)
    elif kind == "ties":  # few distinct magnitudes, both signs
        x = torch.randint(-3, 4, (n,), generator=gen).double() * 0.25
    elif kind == "equal":
        x = torch.full((n,), 0.5, dtype=torch.float64)
    elif kind == "zeros":  # +0.0 and -0.0 must tie
        x = torch.zeros(n, dtype=torch.float64)
        x[torch.rand(n, generator=gen) < 0.5] = -0.0
    elif kind == "special":  # inf, -inf, NaN (several payloads), -0.0, tiny, huge
        x = torch.randn(n, generator=gen, dtype=torch.float64)
        r = torch.rand(n, generator=gen)
        x[r < 0.1] = float("inf")
        x[(r >= 0.1) & (r < 0.2)] = float("-inf")
        x[(r >= 0.2) & (r < 0.3)] = float("nan")
        x[(r >= 0.3) & (r < 0.35)] = -0.0
        x[(r >= 0.35) & (r < 0.4)] = 1e-300
        x[(r >= 0.4) & (r < 0.45)] = 1e300
    else:
        raise AssertionError(kind)
    out = x.to(dtype)
    if kind == "special" and dtype in (torch.float32, torch.float64) and n > 4:
        # NaNs with other payloads and the sign bit set: every NaN must rank the same.
        bits = out.view(torch.int32 if dtype == torch.float32 else torch.int64)
        if dtype == torch.float32:
            bits[:2] = torch.tensor([0x7FC00001, -0x7FFFFFFF - 1 + 0x7F800001], dtype=torch.int32)
        else:
            bits[:2] = torch.tensor([0x7FF8000000000001, -0x7FFFFFFFFFFFFFFF - 1 + 0x7FF0000000000001])
    return out


def _layer(kind, shape, dtype, device, gen, keep_frac=0.7):
    n = 1
    for s in shape:
        n *= s
    w = _values(kind, n, dtype, gen).reshape(shape)
    m = (torch.rand(n, generator=gen) < keep_frac).reshape(shape)
    return w.to(device), m.to(device)


KINDS = ["random", "ties", "equal", "zeros", "special"]
SHAPES = [(0,), (1,), (7,), (3, 5, 3, 3), (257, 131), (BIG,)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", SELECT_DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_select_smallest_matches_reference(device, dtype, kind):
    gen = torch.Generator().manual_seed(hash((str(dtype), kind)) % 2**31)
    layers = [_layer(kind, s, dtype, device, gen) for s in SHAPES]
    ws = [w for w, _ in layers]
    ms = [m for _, m in layers]
    left = [int(m.sum()) for m in ms]
    for counts in (
        [0] * len(ms),
        left,  # everything left
        [min(1, c) for c in left],
        [c // 2 for c in left],
        [int(torch.randint(0, c + 1, (1,), generator=gen)) for c in left],
    ):
        got = select_smallest(ws, ms, counts, backend=BACKEND[device])
        want = reference_select_smallest(ws, ms, counts)
        for i, (g, r) in enumerate(zip(got, want)):
            assert g.dtype == torch.bool and g.shape == r.shape
            assert torch.equal(g, r), f"layer {i} shape {SHAPES[i]} counts {counts[i]}"
            assert int(ms[i].sum() - g.sum()) == counts[i]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_global_smallest_matches_reference(device, kind):
    gen = torch.Generator().manual_seed(hash(kind) % 2**31)
    dtypes = [torch.float32, torch.float32, torch.float32]
    shapes = [(7, 3), (BIG,), (64, 3, 3, 3)]
    layers = [_layer(kind, s, dt, device, gen) for s, dt in zip(shapes, dtypes)]
    ws = [w for w, _ in layers]
    ms = [m for _, m in layers]
    total = sum(int(m.sum()) for m in ms)
    for count in (0, 1, total // 3, total - 1, total):
        got = global_smallest(ws, ms, count, backend=BACKEND[device])
        want = reference_global_smallest(ws, ms, count)
        for g, r in zip(got, want):
            assert torch.equal(g, r), f"count {count}"
        assert sum(int(m.sum() - g.sum()) for m, g in zip(ms, got)) == count


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.bfloat16, torch.float32),
        (torch.float32, torch.float64, torch.float16),
    ],
    ids=lambda d: "-".join(str(x).replace("torch.", "") for x in d),
)
@pytest.mark.parametrize("kind", ["random", "ties", "special"])
def test_global_smallest_mixed_dtypes(device, dtypes, kind):
    # Layers rank by value across dtypes, as the reference's float64 keys do.
    gen = torch.Generator().manual_seed(7)
    layers = [_layer(kind, (1000 + 17 * i,), dt, device, gen) for i, dt in enumerate(dtypes)]
    ws = [w for w, _ in layers]
    ms = [m for _, m in layers]
    total = sum(int(m.sum()) for m in ms)
    for count in (1, total // 2, total):
        got = global_smallest(ws, ms, count, backend=BACKEND[device])
        want = reference_global_smallest(ws, ms, count)
        for g, r in zip(got, want):
            assert torch.equal(g, r)


@pytest.mark.parametrize("device", DEVICES)
def test_select_ties_break_by_lower_index_across_chunks(device):
    # All equal: the first k kept entries in flat order go, wherever the chunk borders fall.
    n = 5 * 65536 + 3
    w = torch.full((n,), 2.0, device=device)
    m = torch.ones(n, dtype=torch.bool, device=device)
    m[::3] = False
    k = 150_001
    (got,) = select_smallest([w], [m], [k], backend=BACKEND[device])
    kept_idx = m.nonzero().squeeze(1)
    want = m.clone()
    want[kept_idx[:k]] = False
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_select_non_contiguous_inputs(device):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(40, 30, generator=gen).to(device).t()  # transposed view
    m = (torch.rand(40, 30, generator=gen) < 0.8).to(device).t()
    for k in (0, 100, int(m.sum())):
        (got,) = select_smallest([w], [m], [k], backend=BACKEND[device])
        # The reference is fed contiguous copies: on a transposed mask its reshape(-1) is a copy
        # and its writes are lost (reported to the lead); the flat order is the same either way.
        (want,) = reference_select_smallest([w.contiguous()], [m.contiguous()], [k])
        assert torch.equal(got, want)
        assert int(m.sum() - got.sum()) == k
        (gg,) = global_smallest([w], [m], k, backend=BACKEND[device])
        assert torch.equal(gg, got)


def test_select_direct_op_rejects_bad_counts():
    w = torch.randn(10)
    m = torch.ones(10, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="only 10"):
        torch.ops.egp_fast.select_smallest([w], [m], [11])
    with pytest.raises(RuntimeError, match="negative"):
        torch.ops.egp_fast.select_smallest([w], [m], [-1])
    with pytest.raises(RuntimeError, match="one count per layer"):
        torch.ops.egp_fast.select_smallest([w], [m], [1, 2])
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.egp_fast.global_smallest([w], [torch.ones(9, dtype=torch.bool)], 1)


def test_select_weights_requiring_grad():
    w = torch.nn.Parameter(torch.randn(50))
    m = torch.ones(50, dtype=torch.bool)
    (got,) = select_smallest([w], [m], [20], backend="cpp")
    (want,) = reference_select_smallest([w], [m], [20])
    assert torch.equal(got, want)


# ---- sign_count ----------------------------------------------------------------------------

SIGN_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _activations(shape, dtype, device, gen, special=False):
    z = torch.randn(shape, generator=gen, dtype=torch.float64)
    if special:
        flat = z.view(-1)
        r = torch.rand(flat.numel(), generator=gen)
        flat[r < 0.1] = float("nan")
        flat[(r >= 0.1) & (r < 0.2)] = 0.0
        flat[(r >= 0.2) & (r < 0.25)] = -0.0
        flat[(r >= 0.25) & (r < 0.3)] = float("inf")
        flat[(r >= 0.3) & (r < 0.35)] = float("-inf")
        flat[(r >= 0.35) & (r < 0.4)] = 0.1  # equal to a tested threshold after the cast
    return z.to(dtype).to(device)


def _layouts():
    # (name, shape, channel_dim, make view from a contiguous tensor)
    return [
        ("nchw", (5, 7, 9, 11), 1, lambda t: t),
        ("nchw_1x1", (3, 13, 1, 1), 1, lambda t: t),
        ("nchw_3x5", (40, 9, 3, 5), 1, lambda t: t),  # small planes, walked as rows of C*H*W
        ("nchw_3x3_one_sample", (1, 2000, 3, 3), 1, lambda t: t),  # one row, small in all
        # rows of 68000 values (over 64K counters): small planes one by one (the short-run loop)
        ("nchw_2x2_wide", (3, 17000, 2, 2), 1, lambda t: t),
        ("nchw_7x9_few", (2, 600, 7, 9), 1, lambda t: t),  # 63-value planes, too few rows
        # more planes than one task's grain (16384 of 4 entries): tasks start mid-channel
        ("nchw_2x2_many", (1601, 11, 2, 2), 1, lambda t: t),
        ("channels_last", (5, 7, 9, 11), 1, lambda t: t.contiguous(memory_format=torch.channels_last)),
        ("nlc", (4, 33, 19), -1, lambda t: t),
        ("nc", (37, 129), 1, lambda t: t),
        ("vector", (23,), 0, lambda t: t),
        ("channel_first", (6, 5, 4), 0, lambda t: t),
        ("transposed", (9, 6, 5), 1, lambda t: t.transpose(0, 2)),  # strided fallback
        ("sliced", (8, 10, 12), 2, lambda t: t[:, 1:7, ::2]),  # strided fallback
        ("big_nchw", (4, 16, 64, 64), 1, lambda t: t),
        ("big_nhwc", (4, 64, 64, 24), 3, lambda t: t),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", SIGN_DTYPES, ids=str)
@pytest.mark.parametrize("layout", _layouts(), ids=lambda x: x[0])
@pytest.mark.parametrize("threshold", [0.0, 0.1, -0.5])
def test_sign_count_matches_reference(device, dtype, layout, threshold):
    _, shape, channel_dim, view = layout
    gen = torch.Generator().manual_seed(11)
    z = view(_activations(shape, dtype, device, gen, special=True))
    c_dim = channel_dim % z.dim()
    start = torch.randint(0, 1000, (z.shape[c_dim],), generator=gen).to(device)
    got = start.clone()
    want = start.clone()
    out = sign_count_(z, got, channel_dim, threshold, backend=BACKEND[device])
    reference_sign_count_(z, want, channel_dim, threshold)
    assert out is got
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_sign_count_into_strided_counts(device):
    z = torch.randn(6, 10, 5, 5, device=device)
    buf = torch.zeros(20, dtype=torch.int64, device=device)
    counts = buf[::2]  # non-contiguous view: the kernel must honour its stride
    sign_count_(z, counts, 1, backend=BACKEND[device])
    want = reference_sign_count_(z, torch.zeros(10, dtype=torch.int64, device=device), 1)
    assert torch.equal(counts, want)
    assert torch.equal(buf[1::2], torch.zeros(10, dtype=torch.int64, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_sign_count_threshold_cast_to_dtype(device):
    # 0.1 is not representable in fp16: torch compares against fp16(0.1) = 0.0999755859375.
    z = torch.tensor([[0.0999755859375, 0.10009765625, 0.1]], dtype=torch.float16, device=device).t()
    for thr in (0.1, 0.09997, 0.0999755859375):
        got = sign_count_(
            z, torch.zeros(1, dtype=torch.int64, device=device), 1, thr, backend=BACKEND[device]
        )
        want = reference_sign_count_(z, torch.zeros(1, dtype=torch.int64, device=device), 1, thr)
        assert torch.equal(got, want), thr


@pytest.mark.parametrize("device", DEVICES)
def test_sign_count_integer_input_uses_reference(device):
    z = torch.randint(-5, 5, (4, 3, 2), device=device)
    got = sign_count_(z, torch.zeros(3, dtype=torch.int64, device=device), 1, backend=BACKEND[device])
    want = reference_sign_count_(z, torch.zeros(3, dtype=torch.int64, device=device), 1)
    assert torch.equal(got, want)


def test_sign_count_direct_op_rejects_bad_counts():
    z = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.egp_fast.sign_count_(z, torch.zeros(3, dtype=torch.int32), 1, 0.0)
    with pytest.raises(RuntimeError, match=r"shape \[3\]"):
        torch.ops.egp_fast.sign_count_(z, torch.zeros(4, dtype=torch.int64), 1, 0.0)


# ---- zero_pruned_ (the masks' CPU zeroing) -----------------------------------------------------


@pytest.mark.parametrize("dtype", SIGN_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (7, 3), (300_007,), (64, 3, 3, 3), (0, 4)], ids=str)
def test_zero_pruned_matches_masked_fill_bit_for_bit(dtype, shape):
    gen = torch.Generator().manual_seed(13)
    t = _activations(shape, dtype, "cpu", gen, special=True)  # NaN, +-Inf, +-0.0 among the values
    pruned = torch.rand(shape, generator=gen) < 0.5
    want = t.clone().masked_fill_(pruned, 0)
    got = t.clone()
    torch.ops.egp_fast.zero_pruned_(got, pruned)
    # Bits, not values: pruned entries become +0.0 (not -0.0), kept NaN payloads survive.
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    assert torch.equal(got.view(bits), want.view(bits))


def test_zero_pruned_rejects_bad_arguments():
    t = torch.randn(4, 5)
    with pytest.raises(RuntimeError, match="bool"):
        torch.ops.egp_fast.zero_pruned_(t, torch.zeros(4, 5, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.egp_fast.zero_pruned_(t, torch.zeros(5, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.egp_fast.zero_pruned_(t.t(), torch.zeros(5, 4, dtype=torch.bool))


# ---- torch.library integration --------------------------------------------------------------


def _opcheck_cases(device):
    gen = torch.Generator().manual_seed(5)
    w1, m1 = _layer("random", (6, 5), torch.float32, device, gen)
    w2, m2 = _layer("ties", (40,), torch.float32, device, gen)
    z = torch.randn(3, 4, 5, 5, device=device)
    return [
        (torch.ops.egp_fast.select_smallest.default, ([w1, w2], [m1, m2], [3, 10])),
        (torch.ops.egp_fast.global_smallest.default, ([w1, w2], [m1, m2], 7)),
        (
            torch.ops.egp_fast.sign_count_.default,
            (z, torch.zeros(4, dtype=torch.int64, device=device), 1, 0.0),
        ),
        (
            torch.ops.egp_fast.sign_count_.default,
            (z.permute(0, 2, 3, 1), torch.zeros(4, dtype=torch.int64, device=device), -1, 0.25),
        ),
    ] + ([(torch.ops.egp_fast.zero_pruned_.default, (z.clone(), z > 0))] if device == "cpu" else [])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile(device):
    gen = torch.Generator().manual_seed(9)
    w, m = _layer("random", (33, 17), torch.float32, device, gen)
    z = torch.randn(4, 6, 7, 7, device=device)

    def f(w, m, z, counts):
        (a,) = torch.ops.egp_fast.select_smallest([w], [m], [50])
        (b,) = torch.ops.egp_fast.global_smallest([w], [a], 20)
        torch.ops.egp_fast.sign_count_(torch.relu(z) - 0.1, counts, 1, 0.0)
        return a, b

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    counts = torch.zeros(6, dtype=torch.int64, device=device)
    a, b = compiled(w, m, z, counts)
    (ra,) = reference_select_smallest([w], [m], [50])
    (rb,) = reference_global_smallest([w], [ra], 20)
    assert torch.equal(a, ra) and torch.equal(b, rb)
    assert torch.equal(counts, reference_sign_count_(torch.relu(z) - 0.1, torch.zeros_like(counts), 1))


def test_extension_state():
    assert _ext.HAS_CPP and _ext.LOAD_ERROR is None
    assert "cpp" in egp_fast.available_backends()
    assert ("cuda" in egp_fast.available_backends()) == _ext.HAS_CUDA


def test_import_without_extension_is_quiet():
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import egp_fast\n"
        "from egp_fast import _ext\n"
        "assert not [w for w in caught if 'egp_fast._C' in str(w.message)], caught\n"
        "assert not _ext.HAS_CPP and 'disabled' in _ext.LOAD_ERROR\n"
        "assert 'cpp' not in egp_fast.available_backends()"
    )
    env = dict(os.environ, EGP_FAST_NO_EXT="1")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
