"""The C++ select paths on 16-bit weights, and global_smallest_counts, against the reference.

* bf16/fp16 layers take the sampled one-pass path from 2**15 entries on, the two-pass path (one
  histogram of every 16-bit key, then the marking pass) from 2**18 on when the sample misleads,
  and the radix path otherwise; each test forces one path with the extension's test hook,
  checks that it ran, and compares with the sort-based reference bit for bit.
* ``global_smallest_counts`` (the per-layer counts of a global selection, without masks): its
  C++ backend on every path and its chunked torch backend against the counts of the
  reference's masks, on ties, NaN, -0.0, inf, odd shapes and mixed dtypes.
"""

from __future__ import annotations

import pytest
import torch

from _select_cases import RADIX, SAMPLED_PATH, TWO_PASS, make_case, paths  # noqa: F401 (paths: a fixture)
from egp_fast import _ext
from egp_fast.errors import ConfigError
from egp_fast.ops import (
    global_smallest,
    global_smallest_counts,
    reference_global_smallest,
    reference_global_smallest_counts,
    reference_select_smallest,
    select_smallest,
)

HALF = [torch.bfloat16, torch.float16]
KINDS = ["random", "ties", "special", "one_bucket"]
BIG = (1 << 18) + 13  # just above the C++ two-pass threshold
needs_cpp = pytest.mark.skipif(not _ext.HAS_CPP, reason="needs the C++ extension")


def _case(kind: str, n: int, dtype: torch.dtype, keep: float, gen: torch.Generator):
    # one_bucket: a few neighbouring 16-bit keys, ties everywhere
    return make_case(kind, n, dtype, keep, gen, bucket=(3, 2.0**-7))


def _ks(m: torch.Tensor, gen: torch.Generator) -> list[int]:
    left = int(m.count_nonzero())
    return [1, left, left // 2, int(torch.randint(0, left + 1, (1,), generator=gen))]


@needs_cpp
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", ["sampled", "two_pass", "radix"])
def test_cpp_16bit_paths_match_reference(dtype, kind, path, paths):
    bits = {"sampled": 1, "two_pass": 2, "radix": 0}[path]
    counts = paths(bits)
    gen = torch.Generator().manual_seed(HALF.index(dtype) * 100 + KINDS.index(kind) * 10 + bits)
    w, m = _case(kind, BIG, dtype, 0.7, gen)
    small_w, small_m = _case(kind, 1000, dtype, 0.7, gen)  # the radix path, same call
    w2d, m2d = _case(kind, 521 * 509, dtype, 0.7, gen)  # an odd 2-D shape: flat index order
    w2d, m2d = w2d.view(521, 509), m2d.view(521, 509)
    solved = [0, 0, 0]
    for k in _ks(m, gen):
        ks = [k, int(small_m.count_nonzero()) // 2, int(m2d.count_nonzero()) // 3]
        ws, ms = [w, small_w, w2d], [m, small_m, m2d]
        got = select_smallest(ws, ms, ks, backend="cpp")
        want = reference_select_smallest(ws, ms, ks)
        assert all(torch.equal(g, r) for g, r in zip(got, want)), k
        c = counts()
        assert sum(c) == 3, c  # every problem solved once
        solved = [a + b for a, b in zip(solved, c)]
    if path == "radix":
        assert solved[SAMPLED_PATH] == solved[TWO_PASS] == 0
    elif path == "two_pass":
        assert solved[SAMPLED_PATH] == 0 and solved[TWO_PASS] == 8  # the two big layers, 4 counts
    elif kind == "random":
        assert solved[SAMPLED_PATH] == 8, "random magnitudes should be bracketed by the sample"


@needs_cpp
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("path", ["sampled", "two_pass", "radix"])
def test_cpp_16bit_global_over_layers(dtype, path, paths):
    # One budget over layers of odd sizes: sample runs and chunks cross layer boundaries.
    bits = {"sampled": 1, "two_pass": 2, "radix": 0}[path]
    counts = paths(bits)
    gen = torch.Generator().manual_seed(13 + bits)
    sizes = ((150_011, 1.0), (5, 3.0), (120_001, 0.5), (33, 2.0))
    ws = [(torch.randn(n, generator=gen) * s).to(dtype) for n, s in sizes]
    ws[2][::7] = -0.0
    ws[0][::11] = float("nan")
    ms = [torch.rand(w.shape, generator=gen) < 0.7 for w in ws]
    total = sum(int(m.count_nonzero()) for m in ms)
    for count in (1, total // 3, total // 2 + 7, total - 1, total):
        got = global_smallest(ws, ms, count, backend="cpp")
        want = reference_global_smallest(ws, ms, count)
        assert all(torch.equal(g, r) for g, r in zip(got, want)), count
        assert counts()[[SAMPLED_PATH, TWO_PASS, RADIX][{1: 0, 2: 1, 0: 2}[bits]]] == 1, count
        c = global_smallest_counts(ws, ms, count, backend="cpp")
        assert c == reference_global_smallest_counts(ws, ms, count), count
        assert counts()[[SAMPLED_PATH, TWO_PASS, RADIX][{1: 0, 2: 1, 0: 2}[bits]]] == 1, count


def _sampled_positions(n: int) -> torch.Tensor:
    """Where the C++ sampled path draws from (csrc/select/select_cpu.cpp, sample_window), for a
    problem of fewer than 2**23 entries."""
    runs = min(2048, max(256, n // 512))
    stride = n // runs
    pos = []
    mask64 = (1 << 64) - 1
    for d in range(runs):
        x = (d + 0x9E3779B97F4A7C15) & mask64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask64
        x ^= x >> 31
        start = d * stride + x % (stride - 8 + 1)
        pos.extend(range(start, start + 8))
    return torch.tensor(pos)


@needs_cpp
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_cpp_16bit_misleading_sample_falls_back(dtype, paths):
    # Every sampled entry is made tiny, so the window misses the k-th key: the bracket check
    # must notice and hand the problem to the two-pass path, whose result is exact.
    counts = paths(3)
    gen = torch.Generator().manual_seed(12)
    n = BIG + 7
    w = torch.randn(n, generator=gen) + 10.0
    at = _sampled_positions(n)
    w[at] = 1e-3 * (1.0 + torch.rand(at.numel(), generator=gen))
    w = w.to(dtype)
    m = torch.ones(n, dtype=torch.bool)
    k = n // 2
    got = select_smallest([w], [m], [k], backend="cpp")[0]
    assert torch.equal(got, reference_select_smallest([w], [m], [k])[0])
    assert counts() == [0, 1, 0]
    assert global_smallest_counts([w], [m], k, backend="cpp") == [k]
    assert counts() == [0, 1, 0]


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _layers(kind: str, dtypes, gen: torch.Generator):
    shapes = [(3, 5), (40_003,), (7, 1, 3), (1,), (70_001,)]
    ws, ms = [], []
    for i, shape in enumerate(shapes):
        n = 1
        for s in shape:
            n *= s
        w, m = _case(kind, n, dtypes[i % len(dtypes)], 0.6 if i % 2 else 1.0, gen)
        ws.append(w.view(shape))
        ms.append(m.view(shape))
    ws[0] = ws[0].t()  # a transposed layer: flat index order of the logical shape
    ms[0] = ms[0].t()
    return ws, ms


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "dtypes", [[d] for d in DTYPES] + [[torch.float16, torch.bfloat16], [torch.bfloat16, torch.float64]], ids=str
)
def test_global_smallest_counts_match_reference(backend, kind, dtypes):
    gen = torch.Generator().manual_seed(KINDS.index(kind) * 7 + len(dtypes))
    ws, ms = _layers(kind, dtypes, gen)
    total = sum(int(m.count_nonzero()) for m in ms)
    for count in (0, 1, total // 3, total // 2 + 1, total - 1, total):
        got = global_smallest_counts(ws, ms, count, backend=backend)
        assert got == reference_global_smallest_counts(ws, ms, count), count
        assert sum(got) == count


@needs_cpp
@pytest.mark.parametrize("bits", [1, 2, 0])
@pytest.mark.parametrize("kind", KINDS)
def test_cpp_counts_fp32_every_path(bits, kind, paths):
    counts = paths(bits)
    gen = torch.Generator().manual_seed(bits * 10 + KINDS.index(kind))
    ws, ms = zip(*[_case(kind, n, torch.float32, 0.8, gen) for n in (150_001, 17, 130_003)])
    total = sum(int(m.count_nonzero()) for m in ms)
    for count in (1, total // 2, total):
        got = global_smallest_counts(ws, ms, count, backend="cpp")
        assert got == reference_global_smallest_counts(ws, ms, count), count
    c = counts()
    if bits == 0:
        assert c == [0, 0, 3]
    elif bits == 2:
        assert c == [0, 3, 0]
    elif kind == "random":
        assert c[SAMPLED_PATH] == 3


def test_torch_counts_in_chunks(monkeypatch):
    """The torch backend keys a chunk at a time: layers spanning several chunks, ties across them."""
    import egp_fast.ops.select_counts as sc

    monkeypatch.setattr(sc, "_CHUNK", 1000)
    gen = torch.Generator().manual_seed(4)
    ws = [torch.randint(0, 5, (n,), generator=gen).float() for n in (3500, 999, 2001)]
    ms = [torch.rand(w.shape, generator=gen) < 0.9 for w in ws]
    total = sum(int(m.count_nonzero()) for m in ms)
    for count in (1, total // 5, total // 2, total):
        assert global_smallest_counts(ws, ms, count, backend="torch") == reference_global_smallest_counts(ws, ms, count)


def test_global_smallest_counts_checks_its_arguments():
    w = torch.randn(4)
    m = torch.ones(4, dtype=torch.bool)
    with pytest.raises(ConfigError, match="count=5 must be in"):
        global_smallest_counts([w], [m], 5)
    with pytest.raises(ConfigError, match="one mask per weight"):
        global_smallest_counts([w], [], 1)
    assert global_smallest_counts([], [], 0) == []
