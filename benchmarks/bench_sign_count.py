"""sign_count benchmarks: reference vs every fast backend, plus a copy-bandwidth yardstick.

pytest-benchmark suite: ``.venv/bin/python -m pytest benchmarks/bench_sign_count.py --benchmark-only``.
On a GPU, ``python benchmarks/bench_sign_count.py`` also prints a table of the Triton tile
configurations against the device-to-device copy bandwidth (the speed bar: >= 80% of it on
64x256x56x56 bf16).
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


if __name__ == "__main__":
    _sweep()
