"""Depth that pays: torchvision mobilenet_v2 and resnet50 (random init, eval, 224x224, CPU)
collapsed under each fold policy, with sites linearised as EASIER leaves them (identity).

* mobilenet_v2: both activations of every other inverted-residual block (features 2, 4, ..., 16:
  16 of 35 sites);
* resnet50: the two inner ReLU calls of every bottleneck (32 of 49 sites); the ReLU after each
  residual add stays.

For each policy: weight layers on the longest path, parameters, FLOPs (batch 1), relative output
change, and the time of the collapsed model over the uncollapsed one at batch 1 and 8
(:func:`egp_fast.folding.compare_latency`, interleaved). Writes a markdown table to stdout.

    python benchmarks/bench_depth.py [--models mobilenet_v2,resnet50] [--budget 4]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch
import torchvision

from egp_fast.folding import collapse, compare_latency, linearize
from egp_fast.measurement import measure_entropy

POLICIES = [
    ("never", True),
    ("auto", True),
    ("auto", False),
    ("latency", False),
    ("always", False),
]


def _sites(name: str) -> list[str]:
    if name == "mobilenet_v2":
        return [f"features.{i}.conv.{j}.2" for i in range(2, 17, 2) for j in (0, 1)]
    blocks = {"layer1": 3, "layer2": 4, "layer3": 6, "layer4": 3}
    return [f"{layer}.{b}.relu{suffix}" for layer, n in blocks.items() for b in range(n) for suffix in ("", ":1")]


def _model(name: str) -> tuple[torch.nn.Module, object, torch.Tensor]:
    torch.manual_seed(0)
    net = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    stats = measure_entropy(net, [x], progress=False)
    done = linearize(net, stats, _sites(name), how="identity")
    assert len(done) == len(_sites(name)), done
    return net, stats, x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mobilenet_v2,resnet50")
    ap.add_argument("--budget", type=float, default=4.0)
    args = ap.parse_args()
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| model | policy | sites linearised | longest path | params | FLOPs | rel. output change | "
          "time b1 (ratio, IQR) | time b8 (ratio, IQR) | collapse s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        net, stats, x = _model(name)
        with torch.no_grad():
            y = net(x)
        for fold, exact in POLICIES:
            t0 = time.perf_counter()
            out = collapse(net, stats, x, exact=exact, fold=fold, measure_latency=False, sites=[])
            took = time.perf_counter() - t0
            with torch.no_grad():
                rel = float((out.model(x) - y).abs().max() / y.abs().max())
            lat = compare_latency(net, out.model, x, batch_sizes=(1, 8), budget_s=args.budget, max_rounds=11)
            cells = []
            for bs in (1, 8):
                row = lat["batches"][bs]
                lo, hi = row["speedup_iqr"]
                cells.append(f"{row['b_ms']:.0f}/{row['a_ms']:.0f} ms = {1 / row['speedup']:.2f} "
                             f"({1 / hi:.2f}-{1 / lo:.2f})")
            b, a = out.before, out.after
            print(f"| {name} | {fold}, exact={exact} | {len(_sites(name))} | {b['longest_path']} → {a['longest_path']} | "
                  f"{b['params'] / 1e6:.2f}M → {a['params'] / 1e6:.2f}M | {b['flops'] / 1e9:.2f}G → {a['flops'] / 1e9:.2f}G | "
                  f"{rel:.1e} | {cells[0]} | {cells[1]} | {took:.0f} |", flush=True)


if __name__ == "__main__":
    main()
