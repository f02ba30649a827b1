"""masked_linear benchmarks: ``F.linear(x, W * M, b)`` (the reference) vs the Triton backend.

Speed bars (GPU): >= 1.0x the reference at every sparsity, >= 2x at 90% zero tiles, for a
4096x4096 bf16 layer at batch 8192. Providers: ``reference``, ``triton`` (the functional op:
builds the tile map on every call) and ``triton_module`` (``MaskedLinear``: the map is cached
until the weight or mask changes, the inference case). ``python benchmarks/bench_masked_linear.py``
on a GPU prints the same table plus the sparse kernel forced at every density, which is how
``DENSE_DENSITY`` (the switch to cuBLAS) is chosen.

``.venv/bin/python -m pytest benchmarks/bench_masked_linear.py --benchmark-only``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA_DEVICE, backend_of, machine, providers, run_timed

from egp_fast import ops
from egp_fast.masks.linear import MaskedLinear

DEVICE = "cuda" if HAS_CUDA_DEVICE else "cpu"


def _median(benchmark) -> float:
    # With --benchmark-disable the fixture records no stats: report NaN rates, not a crash.
    stats = getattr(benchmark, "stats", None)
    return stats.stats.median if stats else float("nan")


if HAS_CUDA_DEVICE:
    BATCH, IN, OUT, DTYPE = 8192, 4096, 4096, torch.bfloat16
else:
    BATCH, IN, OUT, DTYPE = 256, 256, 256, torch.float32

# (name, unstructured sparsity, fraction of whole zero tiles)
PATTERNS = [
    ("dense", 0.0, 0.0),
    ("random50", 0.5, 0.0),
    ("random90", 0.9, 0.0),
    ("tiles50", 0.0, 0.5),
    ("tiles90", 0.0, 0.9),
    ("tiles99", 0.0, 0.99),
]


def _tile_shape() -> tuple[int, int]:
    try:
        from egp_fast.kernels.masked_linear import tile_shape
    except ImportError:  # no Triton: any tile shape makes the same "zero tiles" pattern
        return 128, 64
    return tile_shape(torch.device(DEVICE), DTYPE)


def make_problem(sparsity: float, zero_tiles: float, seed: int = 0):
    """x, zeroed weight, mask, bias for one pattern (weights pruned where the mask is False)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(BATCH, IN, device=DEVICE, generator=g).to(DTYPE)
    w = (torch.randn(OUT, IN, device=DEVICE, generator=g) / IN**0.5).to(DTYPE)
    m = torch.rand(OUT, IN, device=DEVICE, generator=g) >= sparsity
    if zero_tiles:
        bn, bk = _tile_shape()
        tn, tk = -(-OUT // bn), -(-IN // bk)
        off = torch.rand(tn, tk, device=DEVICE, generator=g) < zero_tiles
        m &= ~off.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:OUT, :IN]
    w = w * m
    b = torch.randn(OUT, device=DEVICE, generator=g).to(DTYPE)
    return x, w, m, b


def _providers() -> list[str]:
    out = providers("masked_linear", DEVICE)
    if "triton" in out:
        out.append("triton_module")
    return out


def _call(provider, x, w, m, b):
    if provider == "triton_module":
        layer = MaskedLinear(IN, OUT, device=DEVICE, dtype=DTYPE, backend="triton")
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(b)
            layer.weight_mask.copy_(m)
        return layer, (x,)
    return (lambda *a: ops.masked_linear(*a, backend=backend_of(provider))), (x, w, m, b)


@pytest.mark.benchmark(group="masked_linear")
@pytest.mark.parametrize("pattern", PATTERNS, ids=[p[0] for p in PATTERNS])
@pytest.mark.parametrize("provider", _providers())
def test_masked_linear_forward(benchmark, provider, pattern):
    name, sparsity, zero_tiles = pattern
    x, w, m, b = make_problem(sparsity, zero_tiles)
    fn, args = _call(provider, x, w, m, b)
    with torch.no_grad():
        y = run_timed(benchmark, fn, *args, device=DEVICE)
        ref = ops.reference_masked_linear(x, w, m, b)
    tol = 1e-5 if DTYPE == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), ref.float(), atol=tol, rtol=tol)
    flops = 2 * BATCH * IN * OUT
    benchmark.extra_info.update(
        device=machine(),
        dtype=str(DTYPE),
        shape=[BATCH, IN, OUT],
        kept=float(m.float().mean()),
        dense_TFLOPs=flops / _median(benchmark) / 1e12,
    )


@torch.no_grad()
def _sweep_row(bench, name: str, sparsity: float, zero_tiles: float) -> None:
    from egp_fast.ops import _triton_backend as tb
    from egp_fast.ops.masked_linear import build_tile_map

    x, w, m, b = make_problem(sparsity, zero_tiles)
    dens = build_tile_map(w, m, *_tile_shape()).density
    t_ref = bench(lambda: ops.reference_masked_linear(x, w, m, b))
    t_op = bench(lambda: ops.masked_linear(x, w, m, b, backend="triton"))
    layer, _ = _call("triton_module", x, w, m, b)
    t_mod = bench(lambda: layer(x))
    auto = tb._use_dense
    tb._use_dense = lambda tm, device: False
    try:
        t_sp = bench(lambda: ops.masked_linear(x, w, m, b, backend="triton"))
        y = ops.masked_linear(x, w, m, b, backend="triton")
    finally:
        tb._use_dense = auto
    err = (y.float() - ops.reference_masked_linear(x, w, m, b).float()).abs().max().item()
    print(
        f"{name:10} {dens:7.3f} {t_ref:7.3f} {t_ref / t_op:6.2f} {t_ref / t_mod:6.2f} {t_ref / t_sp:6.2f}"
        f"  sparse {t_sp:.3f} ms, max err {err:.1e}"
    )


def _sweep() -> None:
    """GPU table: reference vs triton (functional and module) and the forced sparse kernel."""
    import triton.testing

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")

    print(f"{torch.cuda.get_device_name()}: x[{BATCH},{IN}] @ W[{OUT},{IN}]^T {DTYPE}, tile {_tile_shape()}")
    print(
        f"{'pattern':10} {'density':>7} {'ref ms':>7} {'op':>6} {'module':>6} {'sparse':>6}  (speed-up vs ref)"
    )
    patterns = PATTERNS + [("tiles25", 0.0, 0.25), ("tiles40", 0.0, 0.4), ("tiles75", 0.0, 0.75)]
    for name, sparsity, zero_tiles in patterns:
        _sweep_row(bench, name, sparsity, zero_tiles)
    # Training step (forward + backward) at 90% zero tiles.
    x, w, m, b = make_problem(0.0, 0.9)
    xr, wr, br = (t.clone().requires_grad_(True) for t in (x, w, b))
    dy = torch.randn(BATCH, OUT, device=DEVICE, dtype=DTYPE)
    layer, _ = _call("triton_module", x, w, m, b)
    xl = x.clone().requires_grad_(True)
    t_ref = bench(lambda: ops.reference_masked_linear(xr, wr, m, br).backward(dy))
    t_mod = bench(lambda: layer(xl).backward(dy))
    print(f"fwd+bwd tiles90: ref {t_ref:.3f} ms, module {t_mod:.3f} ms ({t_ref / t_mod:.2f}x)")


@torch.no_grad()
def _sweep_configs() -> None:
    """Kernel-only times (tile map prebuilt) of tile configurations at densities 1, 0.5, 0.1."""
    import triton.testing
    from egp_fast.kernels.masked_linear import masked_linear_triton

    from egp_fast.ops.masked_linear import build_tile_map

    global _tile_shape
    configs = [
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
        dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
        dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    ]
    saved = _tile_shape
    try:
        for cfg in configs:
            _tile_shape = lambda cfg=cfg: (cfg["BLOCK_N"], cfg["BLOCK_K"])  # noqa: E731
            row = []
            for zero_tiles in (0.0, 0.5, 0.9):
                x, w, m, b = make_problem(0.0, zero_tiles)
                tm = build_tile_map(w, m, cfg["BLOCK_N"], cfg["BLOCK_K"])
                t = triton.testing.do_bench(
                    lambda x=x, w=w, b=b, tm=tm, cfg=cfg: masked_linear_triton(
                        x, w, None, b, tm.row_ptr, tm.row_idx, cfg
                    ),
                    warmup=25,
                    rep=150,
                    return_mode="median",
                )
                row.append(f"d={tm.density:.2f} {t:.3f} ms")
            print(cfg, " | ".join(row))
    finally:
        _tile_shape = saved


if __name__ == "__main__":
    import sys

    _sweep_configs() if "configs" in sys.argv[1:] else _sweep()
