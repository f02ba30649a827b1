"""Collapsed vs original latency (CPU) for the CIFAR-stem ResNet-18 and Swin-T with forced sites.

k sites are forced to zero entropy (the bias before each is pushed far above or below what the
data produces; ON and OFF alternate), the statistics are measured with ``measure_entropy``, and
the model is collapsed with ``exact=False, fold="always"``. Three variants are timed at batch 1
and 64: the original, BatchNorm folding only (``collapse(..., sites=[])``, so the gain of
removing sites is not confused with BN folding) and the collapsed model.

Run: ``.venv/bin/python -m pytest benchmarks/bench_collapse.py --benchmark-only``
Table for docs/collapse.md: ``.venv/bin/python benchmarks/bench_collapse.py``
"""

from __future__ import annotations

import functools

import pytest
import torch

from egp_fast.collapse import collapse, depth_report
from egp_fast.graph import discover_sites
from egp_fast.models import cifar_resnet18
from egp_fast.stats import measure_entropy

RESNET_SITES = ["layer1.0.relu1", "layer2.1.relu1", "layer3.0.relu1", "layer4.1.relu1",
                "layer1.1.relu1", "layer2.0.relu1", "layer3.1.relu1", "layer4.0.relu1"]
_ORDER = ["layer1.0.relu1", "layer1.1.relu1", "layer2.0.relu1", "layer2.1.relu1", "layer3.0.relu1",
          "layer3.1.relu1", "layer4.0.relu1", "layer4.1.relu1"]


def _force(model, x, plan, margin=10.0):
    """Shift the bias right before each site far above (+1) or below (-1) its pre-activations."""
    g = discover_sites(model, x)
    nodes = {n.name: n for n in g.graph_module.graph.nodes}
    for site_name, sign in plan:
        inp = nodes[g.site(site_name).node].args[0]
        while getattr(g.graph_module.get_submodule(inp.target), "bias", None) is None:
            inp = inp.args[0]
        mod = model.get_submodule(inp.target)
        box = {}
        h = mod.register_forward_hook(lambda m, i, o, box=box: box.__setitem__("max", float(o.abs().max())))
        with torch.no_grad():
            model(x)
        h.remove()
        with torch.no_grad():
            mod.bias += sign * (2.0 * box["max"] + margin)


def build_resnet(k: int):
    torch.manual_seed(0)
    model = cifar_resnet18(10, width=64).eval()
    x = torch.randn(8, 3, 32, 32)
    # Forced in execution order: forcing a site changes the pre-activations of every later one.
    sites = sorted(RESNET_SITES[:k], key=_ORDER.index)
    _force(model, x, [(s, 1 if i % 2 == 0 else -1) for i, s in enumerate(sites)])
    return model, x, sites


def build_swin(k: int):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.swin_t(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    names = [s.name for s in discover_sites(model, x).sites]
    sites = names[:: max(1, len(names) // k)][:k] if k < len(names) else names
    _force(model, x, [(s, 1 if i % 2 == 0 else -1) for i, s in enumerate(sites)])
    return model, x, sites


@functools.cache
def variants(arch: str, k: int):
    model, x, sites = build_resnet(k) if arch == "resnet18_cifar" else build_swin(k)
    stats = measure_entropy(model, [x], progress=False)
    bn_only = collapse(model, stats, x, sites=[], measure_latency=False, max_flip=1.0).model
    out = collapse(model, stats, x, exact=False, fold="always", measure_latency=False, max_flip=1.0, sites=sites)
    return {"original": model, "bn_folded": bn_only, "collapsed": out.model}, x, out


@functools.cache
def _flops(arch: str, k: int, variant: str, batch: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    models, x, _ = variants(arch, k)
    xb = x[:1].expand(batch, *x.shape[1:]).contiguous()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        models[variant](xb)
    return int(counter.get_total_flops())


@pytest.mark.benchmark(group="collapse")
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("variant", ["original", "bn_folded", "collapsed"])
@pytest.mark.parametrize("arch,k", [("resnet18_cifar", 4), ("swin_t", 8)])
def test_collapse_latency(benchmark, arch, k, variant, batch):
    models, x, out = variants(arch, k)
    model = models[variant]
    xb = x[:1].expand(batch, *x.shape[1:]).contiguous()
    benchmark.extra_info.update(arch=arch, k=k, variant=variant, batch=batch, threads=torch.get_num_threads(),
                                flops=_flops(arch, k, variant, batch),
                                sites=out.after["sites"] if variant == "collapsed" else out.before["sites"])
    with torch.no_grad():
        # batch 1 is ~40 ms and noisy on a shared CPU: more rounds for a stable median
        benchmark.pedantic(model, args=(xb,), rounds=21 if batch == 1 else 5, warmup_rounds=2, iterations=1)


def main() -> None:
    for arch, k in (("resnet18_cifar", 4), ("resnet18_cifar", 8), ("swin_t", 8)):
        models, x, out = variants(arch, k)
        bn = depth_report(models["bn_folded"], x)
        before = depth_report(models["original"], x)
        after = depth_report(models["collapsed"], x)
        print(f"\n### {arch}, {k} sites forced, input {list(x.shape[1:])}, {torch.get_num_threads()} threads")
        print(f"max |dev| {out.max_deviation:.3g} (relative {out.relative_deviation:.3g}), exact={out.exact}")
        rows = [("nonlinear sites", "sites", "{:d}"), ("weight layers on longest path", "longest_path", "{:d}"),
                ("parameters", "params", "{:,d}"), (f"FLOPs (batch {x.shape[0]})", "flops", "{:,d}"),
                ("latency batch 1 (ms)", "latency_ms_b1", "{:.2f}"), ("latency batch 64 (ms)", "latency_ms_b64", "{:.1f}")]
        print("| | original | BN folded only | collapsed |\n|---|---:|---:|---:|")
        for label, key, fmt in rows:
            print(f"| {label} | {fmt.format(before[key])} | {fmt.format(bn[key])} | {fmt.format(after[key])} |")
        kinds: dict[str, int] = {}
        for e in out.removed:
            kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
        print("removed:", kinds)


if __name__ == "__main__":
    main()
