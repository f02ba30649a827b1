"""Memory: a measurement pass does not grow with the number of batches, and exact-k selection
on big layers needs at most about twice the weights' size in extra memory.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import tracemalloc

import pytest
import torch
import torch.nn as nn

import egp_fast
from egp_fast import _ext


def _live_tensor_bytes() -> int:
    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            try:
                st = obj.untyped_storage()
                ptr = st.data_ptr()
            except (RuntimeError, NotImplementedError):
                continue  # fake/functional tensors other tests' torch.compile left to the gc
            if ptr not in seen:
                seen.add(ptr)
                total += st.nbytes()
    return total


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 4),
    )


@pytest.mark.parametrize("mode", ["exact", "paper"])
def test_measurement_memory_does_not_grow_with_batches(mode):
    net = _net()
    batch_bytes = 8 * 3 * 12 * 12 * 4
    n_batches = 80
    probes = {2: None, 40: None, n_batches - 1: None}

    def data():
        g = torch.Generator().manual_seed(0)
        for i in range(n_batches):
            if i in probes:
                gc.collect()
                probes[i] = (_live_tensor_bytes(), tracemalloc.get_traced_memory()[0])
            yield torch.randn(8, 3, 12, 12, generator=g)

    tracemalloc.start()
    try:
        stats = egp_fast.measure_entropy(net, data(), mode=mode, progress=False)
    finally:
        tracemalloc.stop()
    assert stats.batches == n_batches
    t2, py2 = probes[2]
    for i in (40, n_batches - 1):
        ti, pyi = probes[i]
        # Tensors alive mid-pass: what one batch needs, not one more buffer per batch.
        assert ti <= t2 + batch_bytes, (i, ti, t2)
        # Python-side bookkeeping (lists of per-batch values would show here): < 64 KiB growth.
        assert pyi - py2 < 64 * 1024, (i, pyi - py2)


_SELECT = textwrap.dedent(
    """
    import gc, re, resource, sys, torch, egp_fast
    n = int(sys.argv[1])
    torch.set_num_threads(2)
    w = torch.randn(n)
    m = torch.ones(n, dtype=torch.bool)
    m[::3] = False
    k = int(m.count_nonzero()) // 2
    gc.collect()

    def status(field):
        return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    # The peak must start from here, not from whatever the setup above needed: reset the
    # kernel's high-water mark (Linux: write 5 to clear_refs) and measure against the current
    # resident size. Without that interface, fall back to getrusage's peak, which the setup
    # above keeps at the current size (count_nonzero, unlike sum, needs no n-sized temporary).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status("VmRSS")
        peak = lambda: status("VmHWM")
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = egp_fast.ops.select_smallest([w], [m], [k])[0]
    after = peak()
    assert int(m.count_nonzero()) - int(out.count_nonzero()) == k
    print(after - before)
    """
)


def _select_extra_bytes(n: int) -> int:
    # A fresh process, so the peak RSS is this call's and not an earlier test's.
    env = dict(os.environ, OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", _SELECT, str(n)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return int(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _ext.HAS_CPP, reason="the bound is for the C++ radix select")
@pytest.mark.parametrize("n", [10_000_000, pytest.param(100_000_000, marks=pytest.mark.slow)])
def test_select_smallest_extra_memory_within_twice_the_weights(n):
    extra = _select_extra_bytes(n)
    weights = 4 * n
    # 2x the fp32 weights (the new bool mask is part of it), plus a fixed few MiB for thread
    # stacks and histograms that does not scale with n.
    assert extra <= 2 * weights + 4 * 2**20, f"{extra / 2**20:.1f} MiB for {weights / 2**20:.1f} MiB of weights"
