"""Collapse: depth, FLOPs and CPU latency before/after, exact collapses first.

Cases (random-init models; the sites are chosen, not found by pruning):

* ``resnet18_cifar``: CIFAR-stem ResNet-18 (width 64, 32x32), k of its ``relu1`` sites forced to
  zero entropy (the bias before each pushed far above or below what the data produces, ON and
  OFF alternating), statistics from ``measure_entropy``.
* ``swin_t``: torchvision Swin-T (32x32), k GELU sites forced the same way.
* ``vit_easier``: a 6-block ViT-style stack (width 64, MLP 256, 17 tokens) with every GELU
  replaced by the identity, as EASIER leaves it; collapse folds each MLP into one linear.

Every case is collapsed with ``exact=True`` (variant ``collapsed``: output unchanged up to
rounding; the headline) and, where that differs, with ``exact=False, fold="always"`` (variant
``collapsed_inexact``) (zero-padded conv pairs composed: exact only away
from the border), whose measured deviation is printed next to it. Latency: original and
collapsed model timed interleaved (:func:`egp_fast.folding.compare_latency`), medians and
the interquartile range of the paired ratios.

Run: ``.venv/bin/python benchmarks/bench_collapse.py`` (markdown tables for docs/collapse.md),
or ``.venv/bin/python -m pytest benchmarks/bench_collapse.py --benchmark-only``.
"""

from __future__ import annotations

import functools
import os
import platform
import time

import pytest
import torch
from torch import nn

from egp_fast.folding.collapser import collapse, compare_latency
from egp_fast.folding.affine import ChannelAffine
from egp_fast.graph import discover_sites
from egp_fast.cli.models import cifar_resnet18
from egp_fast.measurement.measure import measure_entropy

RESNET_ORDER = ["layer1.0.relu1", "layer1.1.relu1", "layer2.0.relu1", "layer2.1.relu1", "layer3.0.relu1",
                "layer3.1.relu1", "layer4.0.relu1", "layer4.1.relu1"]
RESNET_PICK = ["layer1.0.relu1", "layer2.1.relu1", "layer3.0.relu1", "layer4.1.relu1",
               "layer1.1.relu1", "layer2.0.relu1", "layer3.1.relu1", "layer4.0.relu1"]


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


class _ViTBlock(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1, self.act, self.fc2 = nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.ln(x))))


def build(case: str, k: int):
    torch.manual_seed(0)
    if case == "resnet18_cifar":
        model = cifar_resnet18(10, width=64).eval()
        x = torch.randn(8, 3, 32, 32)
        sites = sorted(RESNET_PICK[:k], key=RESNET_ORDER.index)  # forcing one changes later ones
        _force(model, x, [(s, 1 if i % 2 == 0 else -1) for i, s in enumerate(sites)])
        return model, x, sites, measure_entropy(model, [x], progress=False)
    if case == "swin_t":
        import torchvision

        model = torchvision.models.swin_t(num_classes=10).eval()
        x = torch.randn(2, 3, 32, 32)
        names = [s.name for s in discover_sites(model, x).sites]
        sites = names[:: max(1, len(names) // k)][:k] if k < len(names) else names
        _force(model, x, [(s, 1 if i % 2 == 0 else -1) for i, s in enumerate(sites)])
        return model, x, sites, measure_entropy(model, [x], progress=False)
    if case == "vit_easier":
        model = nn.Sequential(*[_ViTBlock(64, 256) for _ in range(6)], nn.LayerNorm(64), nn.Linear(64, 10)).eval()
        x = torch.randn(8, 17, 64)
        stats = measure_entropy(model, [x], progress=False)
        sites = list(stats.sites)[:k]
        for name in sites:  # what EASIER's identity linearisation leaves behind
            c = stats.sites[name].channels
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, ChannelAffine(torch.ones(c), torch.zeros(c), -1, False, name))
        return model, x, [], stats
    raise ValueError(case)


@functools.cache
def variants(case: str, k: int):
    model, x, sites, stats = build(case, k)
    res = {"original": (model, None)}
    res["bn_folded"] = (collapse(model, stats, x, sites=[], measure_latency=False).model, None)
    exact = collapse(model, stats, x, exact=True, measure_latency=False, sites=sites, max_flip=1.0)
    res["collapsed"] = (exact.model, exact)  # exact=True: the headline
    inexact = collapse(model, stats, x, exact=False, fold="always", measure_latency=False, sites=sites, max_flip=1.0)
    # Only when exact=False changed something: a border-inexact merge (a GELU site is flagged
    # approximate under both settings, so out.exact alone does not tell).
    if any(not e["exact"] for e in inexact.removed if e["kind"] != "linearize"):
        res["collapsed_inexact"] = (inexact.model, inexact)
    return res, x


@functools.cache
def _flops(case: str, k: int, variant: str, batch: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    models, x = variants(case, k)
    xb = x[:1].expand(batch, *x.shape[1:]).contiguous()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        models[variant][0](xb)
    return int(counter.get_total_flops())


@pytest.mark.benchmark(group="collapse")
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("variant", ["original", "bn_folded", "collapsed", "collapsed_inexact"])
@pytest.mark.parametrize("case,k", [("resnet18_cifar", 4), ("swin_t", 8), ("vit_easier", 6)])
def test_collapse_latency(benchmark, case, k, variant, batch):
    models, x = variants(case, k)
    if variant not in models:
        pytest.skip("exact=False gives the same model here")
    model, out = models[variant]
    xb = x[:1].expand(batch, *x.shape[1:]).contiguous()
    benchmark.extra_info.update(case=case, k=k, variant=variant, batch=batch, threads=torch.get_num_threads(),
                                flops=_flops(case, k, variant, batch),
                                exact=out.exact if out is not None else True,
                                relative_deviation=out.relative_deviation if out is not None else 0.0)
    with torch.no_grad():
        benchmark.pedantic(model, args=(xb,), rounds=21 if batch == 1 else 5, warmup_rounds=2, iterations=1)


def _row(label: str, out, lat) -> str:
    a, b = out.before, out.after
    cells = [label, f"{a['sites']} → {b['sites']}", f"{a['longest_path']} → {b['longest_path']}",
             f"{a['params'] / 1e6:.2f}M → {b['params'] / 1e6:.2f}M", f"{a['flops'] / 1e9:.3f}G → {b['flops'] / 1e9:.3f}G"]
    for bs in (1, 64):
        r = lat["batches"][bs]
        lo, hi = r["speedup_iqr"]
        note = ", noise" if r["inside_noise"] else ""
        cells.append(f"{r['a_ms']:.1f} → {r['b_ms']:.1f} ms ({r['speedup']:.2f}x, IQR {lo:.2f}-{hi:.2f}{note})")
    dev = out.relative_deviation
    if out.exact:
        cells.append(f"exact (rel. dev. {dev:.1g})")
    elif all(e["exact"] for e in out.removed if e["kind"] != "linearize"):
        cells.append(f"GELU sites linearised (approximate), folds exact; rel. dev. {dev:.1g}")
    else:
        cells.append(f"**not exact**: rel. dev. {dev:.2g}")
    return "| " + " | ".join(cells) + " |"


def main(cases=(("vit_easier", 6), ("swin_t", 8), ("resnet18_cifar", 4), ("resnet18_cifar", 8))) -> None:
    cpu = platform.processor() or platform.machine()
    print(f"CPU: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    head = ("| case | sites | longest path | params | FLOPs (example batch) | latency b1 | latency b64 | output |\n"
            "|---|---|---|---|---|---|---|---|")
    rows_exact, rows_inexact = [], []
    for case, k in cases:
        models, x = variants(case, k)
        original = models["original"][0]
        for variant, rows in (("collapsed", rows_exact), ("collapsed_inexact", rows_inexact)):
            if variant not in models:
                continue
            model, out = models[variant]
            lat = compare_latency(original, model, x, budget_s=6.0, max_rounds=15)
            label = f"{case}, k={k}" + (" (exact=False, fold='always')" if variant == "collapsed_inexact" else "")
            rows.append(_row(label, out, lat))
            print(rows[-1], flush=True)  # progress; the tables follow at the end
    print("\n#### exact=True (output unchanged)\n")
    print(head)
    print("\n".join(rows_exact))
    if rows_inexact:
        print("\n#### exact=False (zero-padded convs composed; output differs at the border)\n")
        print(head)
        print("\n".join(rows_inexact))
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
