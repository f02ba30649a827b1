"""The fast select paths against the sort-based reference, bit for bit.

* the torch backend (``torch.kthvalue`` on integer keys: what a build without the extension runs);
* the C++ sampled one-pass path, tried first by fp32 problems of 2**15 entries or more (a
  window around the k-th key from a sample, then the entries inside it only), including ties
  inside the window, samples that mislead on purpose and global problems over several layers;
* the C++ two-pass path, taken by fp32 problems of 2**18 entries or more when the sampled one
  cannot bracket the key (a 16-bit histogram, then the entries of one bucket only), including
  ties that straddle the bucket and global problems that span several layers.

Each C++ test forces its path with the extension's test hook and checks that the path ran.
"""

from __future__ import annotations

import pytest
import torch

from _select_cases import RADIX, SAMPLED_PATH, TWO_PASS, make_case, paths  # noqa: F401 (paths: a fixture)
from egp_fast import _ext
from egp_fast.ops import global_smallest, select_smallest
from egp_fast.ops.select import reference_global_smallest, reference_select_smallest

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
BIG = (1 << 18) + 13  # just above the C++ two-pass threshold
SAMPLED = (1 << 15) + 3  # just above the C++ sampled-path threshold


def _case(kind: str, n: int, dtype: torch.dtype, keep: float, gen: torch.Generator):
    # one_bucket: every magnitude in one 16-bit bucket, so all are candidates
    return make_case(kind, n, dtype, keep, gen)


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
def test_cpp_two_pass_matches_reference(kind, keep, paths):
    counts = paths(2)  # two-pass (and radix) only
    gen = torch.Generator().manual_seed(int(keep * 10) + 100 * len(kind))
    w, m = _case(kind, BIG, torch.float32, keep, gen)
    small_w, small_m = _case(kind, 1000, torch.float32, keep, gen)  # the radix path, same call
    for k in _counts(m, gen):
        ks = [k, int(small_m.count_nonzero()) // 2]
        got = select_smallest([w, small_w], [m, small_m], ks, backend="cpp")
        want = reference_select_smallest([w, small_w], [m, small_m], ks)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), k
        assert counts()[TWO_PASS] == (1 if k > 0 else 0), k


@pytest.mark.skipif(not _ext.HAS_CPP, reason="needs the C++ extension")
def test_cpp_two_pass_global_over_layers(paths):
    counts = paths(2)
    gen = torch.Generator().manual_seed(5)
    ws = [torch.randint(0, 9, (150_001,), generator=gen).float(), torch.randn(120_007, generator=gen).abs().round()]
    ms = [torch.rand(w.shape, generator=gen) < 0.8 for w in ws]
    total = sum(int(m.count_nonzero()) for m in ms)
    for count in (1, total // 3, total // 2 + 7, total):
        got = global_smallest(ws, ms, count, backend="cpp")
        want = reference_global_smallest(ws, ms, count)
        assert all(torch.equal(g, r) for g, r in zip(got, want)), count
        assert counts()[TWO_PASS] == 1


@pytest.mark.skipif(not _ext.HAS_CPP, reason="needs the C++ extension")
@pytest.mark.parametrize("kind", ["random", "ties", "special", "one_bucket"])
@pytest.mark.parametrize("keep", [1.0, 0.4])
@pytest.mark.parametrize("n", [SAMPLED, BIG + 5])
def test_cpp_sampled_matches_reference(kind, keep, n, paths):
    counts = paths(1)  # sampled, falling back to radix
    gen = torch.Generator().manual_seed(int(keep * 10) + 100 * len(kind) + n % 97)
    w, m = _case(kind, n, torch.float32, keep, gen)
    small_w, small_m = _case(kind, 1000, torch.float32, keep, gen)
    solved = 0
    for k in _counts(m, gen):
        ks = [k, int(small_m.count_nonzero()) // 2]
        got = select_smallest([w, small_w], [m, small_m], ks, backend="cpp")
        want = reference_select_smallest([w, small_w], [m, small_m], ks)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), k
        c = counts()
        solved += c[SAMPLED_PATH]
        assert c[SAMPLED_PATH] + c[RADIX] == (2 if k > 0 else 1), (k, c)  # every problem solved once
    if kind == "random":  # k = 1, all, half, random: each bracketed by the sample
        assert solved == 4, "random magnitudes should be bracketed by the sample"


@pytest.mark.skipif(not _ext.HAS_CPP, reason="needs the C++ extension")
def test_cpp_sampled_ties_inside_the_window(paths):
    # 10% of the entries share the key at the median: the window is that one key, and which of
    # the ties go is decided by index among the candidates.
    counts = paths(1)
    gen = torch.Generator().manual_seed(11)
    n = BIG
    r = torch.rand(n, generator=gen)
    w = torch.where(r < 0.45, torch.rand(n, generator=gen) * 0.5, 2.0 + torch.rand(n, generator=gen))
    w[(r >= 0.45) & (r < 0.55)] = -1.0
    m = torch.ones(n, dtype=torch.bool)
    for k in (n // 2, n // 2 + 1000, int((r < 0.45).sum()) + 1):
        got = select_smallest([w], [m], [k], backend="cpp")[0]
        assert torch.equal(got, reference_select_smallest([w], [m], [k])[0]), k
        assert counts()[SAMPLED_PATH] == 1


def _sampled_positions(n: int) -> torch.Tensor:
    """Where the C++ sampled path draws from (csrc/select/select_cpu.cpp, sample_window)."""
    runs = min(2048, max(256, n // 512))
    stride = n // runs
    span = stride - 8 + 1
    pos = []
    mask64 = (1 << 64) - 1
    for d in range(runs):
        x = (d + 0x9E3779B97F4A7C15) & mask64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask64
        x ^= x >> 31
        start = d * stride + x % span
        pos.extend(range(start, start + 8))
    return torch.tensor(pos)


@pytest.mark.skipif(not _ext.HAS_CPP, reason="needs the C++ extension")
@pytest.mark.parametrize("lie", ["low", "high"])
def test_cpp_sampled_misleading_sample_falls_back(lie, paths):
    # The sampled entries are made unrepresentative on purpose, so the window misses the k-th
    # key: the bracket check must notice and hand the layer to another path, whose result is
    # exact (the partly written output of the sampled pass is overwritten).
    counts = paths(3)
    gen = torch.Generator().manual_seed(12)
    n = BIG + 7
    w = torch.randn(n, generator=gen) + 10.0
    at = _sampled_positions(n)
    w[at] = (1e-6 if lie == "low" else 1e6) * (1.0 + torch.rand(at.numel(), generator=gen))
    m = torch.ones(n, dtype=torch.bool)
    k = n // 2
    got = select_smallest([w], [m], [k], backend="cpp")[0]
    assert torch.equal(got, reference_select_smallest([w], [m], [k])[0])
    c = counts()
    assert c[SAMPLED_PATH] == 0 and c[TWO_PASS] == 1, c


@pytest.mark.skipif(not _ext.HAS_CPP, reason="needs the C++ extension")
def test_cpp_sampled_global_over_layers(paths):
    # One budget over layers of odd sizes: sample runs and chunks cross layer boundaries.
    counts = paths(1)
    gen = torch.Generator().manual_seed(13)
    ws = [torch.randn(n, generator=gen) * s for n, s in ((20_011, 1.0), (5, 3.0), (70_001, 0.5), (33, 2.0))]
    ms = [torch.rand(w.shape, generator=gen) < 0.7 for w in ws]
    total = sum(int(m.count_nonzero()) for m in ms)
    for count in (1, total // 3, total // 2 + 7, total - 1, total):
        got = global_smallest(ws, ms, count, backend="cpp")
        want = reference_global_smallest(ws, ms, count)
        assert all(torch.equal(g, r) for g, r in zip(got, want)), count
        assert counts()[SAMPLED_PATH] == 1, count


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
