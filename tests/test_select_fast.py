"""The fast select paths against the sort-based reference, bit for bit.

* the torch backend (``torch.kthvalue`` on integer keys: what a build without the extension runs);
* the C++ two-pass path, taken by fp32 problems of 2**18 entries or more (a 16-bit histogram,
  then the entries of one bucket only), including ties that straddle the bucket and global
  problems that span several layers.
"""

from __future__ import annotations

import pytest
import torch

from egp_fast import _ext
from egp_fast.ops import global_smallest, select_smallest
from egp_fast.ops.select import reference_global_smallest, reference_select_smallest

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
BIG = (1 << 18) + 13  # just above the C++ two-pass threshold


def _case(kind: str, n: int, dtype: torch.dtype, keep: float, gen: torch.Generator):
    if kind == "random":
        w = torch.randn(n, generator=gen)
    elif kind == "ties":
        w = torch.randint(-3, 4, (n,), generator=gen).float() * 0.25
    elif kind == "special":
        w = torch.randn(n, generator=gen)
        r = torch.rand(n, generator=gen)
        w[r < 0.05] = float("nan")
        w[(r >= 0.05) & (r < 0.1)] = float("inf")
        w[(r >= 0.1) & (r < 0.15)] = -float("inf")
        w[(r >= 0.15) & (r < 0.3)] = -0.0
        w[(r >= 0.3) & (r < 0.4)] = 0.0
    elif kind == "one_bucket":  # every magnitude in one 16-bit bucket: all are candidates
        w = 1.0 + torch.randint(0, 50, (n,), generator=gen).float() * 2.0**-20
    else:
        raise AssertionError(kind)
    m = torch.rand(n, generator=gen) < keep
    return w.to(dtype), m


def _counts(m: torch.Tensor, gen: torch.Generator) -> list[int]:
    left = int(m.count_nonzero())
    return [0, min(1, left), left, left // 2, int(torch.randint(0, left + 1, (1,), generator=gen))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "ties", "special"])
def test_torch_backend_matches_reference(dtype, kind):
    gen = torch.Generator().manual_seed(DTYPES.index(dtype) * 10 + ["random", "ties", "special"].index(kind))
    for n, keep in ((1, 1.0), (7, 0.5), (64, 1.0), (1000, 0.7), (4099, 0.3)):
        w, m = _case(kind, n, dtype, keep, gen)
        for k in _counts(m, gen):
            got = select_smallest([w], [m], [k], backend="torch")[0]
            want = reference_select_smallest([w], [m], [k])[0]
            assert torch.equal(got, want), (n, keep, k)


def test_torch_backend_layouts_and_many_layers():
    gen = torch.Generator().manual_seed(3)
    ws = [torch.randn(6, 8, generator=gen).t(), torch.randn(2, 3, 3, 3, generator=gen).to(memory_format=torch.channels_last),
          torch.randn(5, generator=gen)]
    ms = [torch.rand(w.shape, generator=gen) < 0.6 for w in ws]
    counts = [int(m.count_nonzero()) // 2 for m in ms]
    got = select_smallest(ws, ms, counts, backend="torch")
    want = reference_select_smallest(ws, ms, counts)
    assert all(torch.equal(g, r) for g, r in zip(got, want))
    assert all(int(m.count_nonzero()) - int(g.count_nonzero()) == k for m, g, k in zip(ms, got, counts))


@pytest.mark.skipif(not _ext.HAS_CPP, reason="needs the C++ extension")
@pytest.mark.parametrize("kind", ["random", "ties", "special", "one_bucket"])
@pytest.mark.parametrize("keep", [1.0, 0.4])
def test_cpp_two_pass_matches_reference(kind, keep):
    gen = torch.Generator().manual_seed(int(keep * 10) + 100 * len(kind))
    w, m = _case(kind, BIG, torch.float32, keep, gen)
    small_w, small_m = _case(kind, 1000, torch.float32, keep, gen)  # the radix path, same call
    for k in _counts(m, gen):
        ks = [k, int(small_m.count_nonzero()) // 2]
        got = select_smallest([w, small_w], [m, small_m], ks, backend="cpp")
        want = reference_select_smallest([w, small_w], [m, small_m], ks)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), k


@pytest.mark.skipif(not _ext.HAS_CPP, reason="needs the C++ extension")
def test_cpp_two_pass_global_over_layers():
    gen = torch.Generator().manual_seed(5)
    ws = [torch.randint(0, 9, (150_001,), generator=gen).float(), torch.randn(120_007, generator=gen).abs().round()]
    ms = [torch.rand(w.shape, generator=gen) < 0.8 for w in ws]
    total = sum(int(m.count_nonzero()) for m in ms)
    for count in (1, total // 3, total // 2 + 7, total):
        got = global_smallest(ws, ms, count, backend="cpp")
        want = reference_global_smallest(ws, ms, count)
        assert all(torch.equal(g, r) for g, r in zip(got, want)), count


def test_torch_backend_threaded_over_layers(monkeypatch):
    # Calls of 2**20 weights or more run layers side by side in threads: same result.
    import egp_fast.ops.select as sel

    monkeypatch.setattr(sel, "_PARALLEL_MIN", 1000)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    gen = torch.Generator().manual_seed(9)
    ws = [torch.randn(n, generator=gen) for n in (3000, 17, 2500, 900)]
    ws[2] = ws[2].round()  # ties
    ms = [torch.rand(w.shape, generator=gen) < 0.7 for w in ws]
    counts = [int(m.count_nonzero()) // 2 for m in ms]
    got = select_smallest(ws, ms, counts, backend="torch")
    want = reference_select_smallest(ws, ms, counts)
    assert all(torch.equal(g, r) for g, r in zip(got, want))
