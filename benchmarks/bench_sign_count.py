"""sign_count benchmarks: reference vs every fast backend, plus a copy-bandwidth yardstick.

pytest-benchmark suite: ``.venv/bin/python -m pytest benchmarks/bench_sign_count.py --benchmark-only``.
On a GPU, ``python benchmarks/bench_sign_count.py`` also prints a table of the Triton tile
configurations against the device-to-device copy bandwidth (the speed bar: >= 80% of it on
64x256x56x56 bf16). ``python benchmarks/bench_sign_count.py --cpu [--threads N]`` prints the CPU
kernel on resnet18's activation shapes (4 batches of 64 at 32x32 have these sites): its AVX2 and
plain loops against ``torch.relu`` and ``x.sum()`` (a read at the memory system's speed),
interleaved, and the same counts inside the running model, where the activation arrives from
the previous layer instead of sitting in cache.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA_DEVICE, backend_of, machine, providers, run_timed

from egp_fast import ops

DEVICE = "cuda" if HAS_CUDA_DEVICE else "cpu"


def _median(benchmark) -> float:
    # With --benchmark-disable the fixture records no stats: report NaN rates, not a crash.
    stats = getattr(benchmark, "stats", None)
    return stats.stats.median if stats else float("nan")


# (name, shape, channel_dim, channels_last). GPU: the speed-bar shape and the token layouts;
# CPU: small versions that time in well under a second.
if HAS_CUDA_DEVICE:
    CASES = [
        ("resnet_stem_nchw", (64, 256, 56, 56), 1, False),
        ("resnet_stem_cl", (64, 256, 56, 56), 1, True),
        ("late_small_hw", (256, 2048, 7, 7), 1, False),
        ("vit_tokens_nlc", (256, 197, 768), -1, False),
        ("few_channels", (256, 3, 224, 224), 1, False),
    ]
    DTYPES = [torch.bfloat16, torch.float32]
else:
    CASES = [("nchw", (16, 64, 28, 28), 1, False), ("nlc", (32, 49, 96), -1, False)]
    DTYPES = [torch.float32]


def _input(shape, channels_last, dtype):
    z = torch.randn(shape, device=DEVICE, dtype=dtype)
    return z.contiguous(memory_format=torch.channels_last) if channels_last else z


@pytest.mark.benchmark(group="sign_count")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,shape,channel_dim,channels_last", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("provider", providers("sign_count", DEVICE))
def test_sign_count(benchmark, provider, name, shape, channel_dim, channels_last, dtype):
    z = _input(shape, channels_last, dtype)
    counts = torch.zeros(shape[channel_dim], dtype=torch.int64, device=DEVICE)
    run_timed(benchmark, ops.sign_count_, z, counts, channel_dim, device=DEVICE, backend=backend_of(provider))
    # The timed calls accumulated; one fresh call must equal the reference exactly.
    counts.zero_()
    ops.sign_count_(z, counts, channel_dim, backend=backend_of(provider))
    ref = torch.zeros_like(counts)
    ops.reference_sign_count_(z, ref, channel_dim)
    assert torch.equal(counts, ref)
    nbytes = z.numel() * z.element_size()
    benchmark.extra_info.update(
        device=machine(),
        dtype=str(dtype),
        shape=list(shape),
        bytes_read=nbytes,
        GBps=nbytes / _median(benchmark) / 1e9,
    )


@pytest.mark.benchmark(group="sign_count")
@pytest.mark.skipif(not HAS_CUDA_DEVICE, reason="the yardstick is for GPUs")
def test_copy_bandwidth(benchmark):
    """Device-to-device copy of the speed-bar tensor; GB/s counts bytes read + written."""
    src = torch.randn(64, 256, 56, 56, device=DEVICE, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    run_timed(benchmark, dst.copy_, src, device=DEVICE)
    benchmark.extra_info.update(
        device=machine(), GBps=2 * src.numel() * src.element_size() / _median(benchmark) / 1e9
    )


# What a measured ReLU costs: the ReLU alone (the floor: a forward pays it anyway), the ReLU
# plus a separate sign_count_ (two reads of z, what a hook does) and relu_sign_count (one read).
RELU_CASES = (
    [("resnet_stem_nchw", (64, 256, 56, 56), False), ("resnet_stem_cl", (64, 256, 56, 56), True)]
    if HAS_CUDA_DEVICE else
    [("resnet18_32px_layer1", (64, 64, 8, 8), False), ("resnet18_32px_stem", (64, 64, 16, 16), False),
     ("nchw_28", (16, 64, 28, 28), False)]
)


@pytest.mark.benchmark(group="relu_sign_count")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,shape,channels_last", RELU_CASES, ids=[c[0] for c in RELU_CASES])
@pytest.mark.parametrize("provider", ["relu_alone", "relu+sign_count", "relu_sign_count"])
def test_relu_sign_count(benchmark, provider, name, shape, channels_last, dtype):
    z = _input(shape, channels_last, dtype)
    work = z.clone(memory_format=torch.preserve_format)  # in place, as nn.ReLU(inplace=True) runs
    counts = torch.zeros(shape[1], dtype=torch.int64, device=DEVICE)

    def relu_alone():
        return torch.relu_(work.copy_(z))

    def separate():
        ops.sign_count_(work.copy_(z), counts, 1)
        return torch.relu_(work)

    def fused():
        return ops.relu_sign_count(work.copy_(z), counts, 1, inplace=True)

    # Each call restores z first (a copy), so every provider carries the same copy.
    fn = {"relu_alone": relu_alone, "relu+sign_count": separate, "relu_sign_count": fused}[provider]
    run_timed(benchmark, fn, device=DEVICE)
    if provider != "relu_alone":
        counts.zero_()
        fn()
        ref = ops.reference_sign_count_(z, torch.zeros_like(counts), 1)
        assert torch.equal(counts, ref) and torch.equal(work, torch.relu(z))
    benchmark.extra_info.update(device=machine(), dtype=str(dtype), shape=list(shape))


def _sweep() -> None:
    """Print Triton configurations vs copy bandwidth (GPU only); used to pick the defaults."""
    import triton.testing
    from egp_fast.kernels.sign_count import sign_count_triton

    src = torch.randn(64, 256, 56, 56, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()
    t_copy = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    copy_bw = 2 * nbytes / t_copy / 1e6
    print(f"{torch.cuda.get_device_name()}: copy {copy_bw:.0f} GB/s (read+write)")
    counts = torch.zeros(256, dtype=torch.int64, device="cuda")
    rows = []
    for layout in ("nchw", "cl"):
        z = src if layout == "nchw" else src.contiguous(memory_format=torch.channels_last)
        configs = [{}]
        if layout == "nchw":
            configs += [
                {"block_c": bc, "block_p": bp, "num_warps": w, "programs": p}
                for bc, bp in ((2, 2048), (4, 2048), (1, 4096), (2, 4096), (4, 4096))
                for w in (4, 8)
                for p in (132 * 8, 132 * 16)
            ]
        else:
            configs += [
                {"block_c": bc, "block_p": bp, "num_warps": w, "programs": p}
                for bc, bp in ((128, 64), (128, 128), (64, 256), (64, 128))
                for w in (4, 8)
                for p in (132 * 8, 132 * 16)
            ]
        for cfg in configs:
            t = triton.testing.do_bench(
                lambda cfg=cfg, z=z: sign_count_triton(z, counts, 1, **cfg),
                warmup=50,
                rep=200,
                return_mode="median",
            )
            rows.append((layout, cfg, nbytes / t / 1e6))
    for layout in ("nchw", "cl"):
        best = sorted((r for r in rows if r[0] == layout), key=lambda r: -r[2])[:5]
        dflt = next(r for r in rows if r[0] == layout and not r[1])
        print(f"{layout} default: {dflt[2]:.0f} GB/s = {dflt[2] / copy_bw:.0%} of copy")
        for _, cfg, bw in best:
            print(f"  {cfg}: {bw:.0f} GB/s = {bw / copy_bw:.0%} of copy")
    for prov in providers("sign_count", "cuda"):
        t = triton.testing.do_bench(
            lambda prov=prov: ops.sign_count_(src, counts, 1, backend=backend_of(prov)),
            warmup=50,
            rep=200,
            return_mode="median",
        )
        print(f"provider {prov}: {nbytes / t / 1e6:.0f} GB/s ({t * 1e3:.1f} us)")


RESNET18_32 = [(64, 64, 16, 16), (64, 64, 8, 8), (64, 128, 4, 4), (64, 256, 2, 2), (64, 512, 1, 1)]


def _cpu_table(threads: int, rounds: int = 7) -> None:
    """GB/s (bytes read) of the CPU kernel's AVX2 and plain loops, torch.relu and x.sum() on
    resnet18's activation shapes, interleaved; min over rounds of the thread's CPU time at 1
    thread (steady on a loaded machine), of wall time otherwise."""
    import time

    torch.set_num_threads(threads)
    clock = time.thread_time if threads == 1 else time.perf_counter
    mode = torch.ops.egp_fast._sign_count_vector_mode
    op = torch.ops.egp_fast.sign_count_.default
    print(f"threads={threads}, load average {open('/proc/loadavg').read().split()[:3]}")
    try:
        for shape in RESNET18_32:
            x = torch.randn(shape)
            c = torch.zeros(shape[1], dtype=torch.int64)
            fns = {
                "avx2": lambda: (mode(1), op(x, c, 1, 0.0)),
                "plain": lambda: (mode(0), op(x, c, 1, 0.0)),
                "relu": lambda: torch.relu(x),
                "sum": lambda: x.sum(),
            }
            n = max(5, 100 * 262144 // x.numel())
            best = {k: float("inf") for k in fns}
            for _ in range(rounds):
                for k, f in fns.items():
                    t0 = clock()
                    for _ in range(n):
                        f()
                    best[k] = min(best[k], (clock() - t0) / n)
            nbytes = x.numel() * x.element_size()
            print(f"{'x'.join(map(str, shape)):>12} " + "  ".join(
                f"{k} {best[k] * 1e6:6.1f} us {nbytes / best[k] / 1e9:5.1f} GB/s" for k in fns))
    finally:
        mode(1)


def _in_model(threads: int, forwards: int = 15) -> None:
    """Inside resnet18's forward: each site's count as measurement runs it (the activation
    just written by the previous layer), then the same count again (now in cache), then an
    out-of-place relu of it; ms per batch of 64, summed over the 17 sites, medians."""
    import time

    import torchvision

    from egp_fast.measurement import cached_graph
    from egp_fast.measurement.recorders import _HookRecorder

    torch.set_num_threads(threads)
    clock = time.thread_time if threads == 1 else time.perf_counter
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(64, 3, 32, 32)
    graph = cached_graph(model, x)
    op = torch.ops.egp_fast.sign_count_.default
    counts = [torch.zeros(s.channels, dtype=torch.int64) for s in graph.sites]
    acc = [0.0, 0.0, 0.0]

    class _Timed:
        def record(self, i, z):
            t0 = clock()
            op(z, counts[i], 1, 0.0)
            t1 = clock()
            op(z, counts[i], 1, 0.0)
            t2 = clock()
            torch.relu(z)
            acc[0] += t1 - t0
            acc[1] += t2 - t1
            acc[2] += clock() - t2

    rec = _HookRecorder(model, list(enumerate(graph.sites)), _Timed())
    runs = []
    try:
        with torch.no_grad():
            for _ in range(forwards):
                acc[:] = [0.0, 0.0, 0.0]
                rec.reset()
                model(x)
                runs.append(list(acc))
    finally:
        rec.remove()
    med = [sorted(r[k] for r in runs)[len(runs) // 2] * 1e3 for k in range(3)]
    print(f"in the model ({threads} thread(s)): count as measured {med[0]:.3f} ms/batch, "
          f"again from cache {med[1]:.3f} ms, relu {med[2]:.3f} ms")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="sign_count_ speed tables (GPU: Triton sweep; --cpu: CPU kernel)")
    ap.add_argument("--cpu", action="store_true", help="the CPU kernel on resnet18's activation shapes")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    if a.cpu:
        _cpu_table(a.threads)
        _in_model(a.threads)
    else:
        _sweep()
