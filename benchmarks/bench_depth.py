"""Depth that pays: real-size models (random init, eval, CPU) collapsed under each fold policy,
with sites linearised as EASIER leaves them (``linearize(how="identity")``).

* mobilenet_v2 (224x224): both activations of every other inverted-residual block
  (features 2, 4, ..., 16: 16 of 35 sites);
* resnet50 (224x224): the two inner ReLU calls of every bottleneck (32 of 49 sites); the ReLU
  after each residual add stays;
* vit_b_16 (224x224): the MLP GELU of every other encoder layer (6 of 12);
* bert_base (transformers ``BertConfig()``, sequence length 128; skipped with a message when
  transformers is not installed): the intermediate GELU of every other layer (6 of 12).

For each policy: weight layers on the longest path, parameters, FLOPs (batch 1), relative output
change, and the time of the collapsed model over the uncollapsed one at batch 1 and 8
(:func:`egp_fast.folding.compare_latency`, interleaved; IQR of the paired ratio). Under
``fold="latency"`` the table also says which plan was kept: the FLOPs plan when no chain's timed
saving beat the noise, else the latency plan if the whole model timed faster, else the FLOPs plan. Prints a markdown table; ``--out PREFIX`` also writes PREFIX.md and
PREFIX.json with the load average before and after each row.

    python benchmarks/bench_depth.py [--models mobilenet_v2,resnet50,vit_b_16,bert_base] [--budget 4]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import torch
import torchvision

from egp_fast.folding import LatencyCost, collapse, compare_latency, linearize
from egp_fast.measurement import measure_entropy

POLICIES = [
    ("never", True),
    ("auto", True),
    ("auto", False),
    ("latency", False),
    ("always", False),
]
MODELS = ("mobilenet_v2", "resnet50", "vit_b_16", "bert_base")


def _sites(name: str) -> list[str]:
    if name == "mobilenet_v2":
        return [f"features.{i}.conv.{j}.2" for i in range(2, 17, 2) for j in (0, 1)]
    if name == "resnet50":
        blocks = {"layer1": 3, "layer2": 4, "layer3": 6, "layer4": 3}
        return [f"{layer}.{b}.relu{suffix}" for layer, n in blocks.items() for b in range(n) for suffix in ("", ":1")]
    if name == "vit_b_16":
        return [f"encoder.layers.encoder_layer_{i}.mlp.1" for i in range(0, 12, 2)]
    return [f"encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(0, 12, 2)]


def _model(name: str) -> tuple[torch.nn.Module, object, object] | None:
    torch.manual_seed(0)
    if name == "bert_base":
        try:
            from transformers import BertConfig, BertModel
        except ImportError:
            print("bert_base skipped: transformers is not installed (pip install transformers)\n")
            return None
        net = BertModel(BertConfig()).eval()
        x: object = {"input_ids": torch.randint(0, net.config.vocab_size, (1, 128))}
    else:
        net = getattr(torchvision.models, name)(weights=None).eval()
        x = torch.randn(1, 3, 224, 224)
        if name == "vit_b_16":  # torchvision zero-initialises the head: give the output a scale
            torch.nn.init.normal_(net.heads.head.weight, std=0.02)
    stats = measure_entropy(net, [x], progress=False)
    done = linearize(net, stats, _sites(name), how="identity")
    assert len(done) == len(_sites(name)), done
    return net, stats, x


def _out(y: object) -> torch.Tensor:
    return y if isinstance(y, torch.Tensor) else y[0]


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    ap.add_argument("--policies", default=None, help="comma-separated fold:exact pairs, e.g. auto:False,latency:False "
                                                      "(default: never:True,auto:True,auto:False,latency:False,always:False)")
    ap.add_argument("--budget", type=float, default=4.0, help="seconds of interleaved timing per batch size")
    ap.add_argument("--out", default=None, help="also write OUT.md and OUT.json")
    args = ap.parse_args()
    policies = POLICIES if args.policies is None else [
        (p.split(":")[0], p.split(":")[1] == "True") for p in args.policies.split(",")]
    head = (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
            f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load average at start {_load()}")
    lines = [head, "", "| model | policy | sites linearised | longest path | params | FLOPs | rel. output change | "
             "time b1 (ratio, IQR) | time b8 (ratio, IQR) | collapse s | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    rows = []
    for name in args.models.split(","):
        built = _model(name)
        if built is None:
            lines.append(f"| {name} | skipped: transformers is not installed | | | | | | | | | |")
            continue
        net, stats, x = built
        with torch.no_grad():
            y = _out(net(**x) if isinstance(x, dict) else net(x))
        for fold, exact in policies:
            load0 = _load()
            t0 = time.perf_counter()
            cost = LatencyCost(check_batches=(1, 8), check_budget_s=args.budget) if fold == "latency" else None
            out = collapse(net, stats, x, exact=exact, fold=fold, measure_latency=False, sites=[], cost=cost)
            took = time.perf_counter() - t0
            with torch.no_grad():
                got = _out(out.model(**x) if isinstance(x, dict) else out.model(x))
                rel = float((got - y).abs().max() / y.abs().max())
            # The transformers' batch-8 forwards take seconds on 2 threads: 3 rounds at least there.
            lat = compare_latency(net, out.model, x, batch_sizes=(1, 8), budget_s=args.budget, max_rounds=11,
                                  min_rounds=5 if name in ("mobilenet_v2", "resnet50") else 3)
            cells = []
            for bs in (1, 8):
                r = lat["batches"][bs]
                lo, hi = r["speedup_iqr"]
                cells.append(f"{r['b_ms']:.0f}/{r['a_ms']:.0f} ms = {1 / r['speedup']:.2f} ({1 / hi:.2f}-{1 / lo:.2f})")
            b, a = out.before, out.after
            label = f"{fold}, exact={exact}"
            if fold == "latency":
                label += (" (kept the auto plan: not faster when timed)" if out.plan.get("used") == "auto" else
                          " (latency plan, timed faster)" if "confirm" in out.plan else
                          " (= auto plan: no timed saving beyond noise)")
            load = [load0, _load()]
            line = (f"| {name} | {label} | {len(_sites(name))} | {b['longest_path']} → {a['longest_path']} | "
                    f"{b['params'] / 1e6:.2f}M → {a['params'] / 1e6:.2f}M | {b['flops'] / 1e9:.2f}G → "
                    f"{a['flops'] / 1e9:.2f}G | {rel:.1e} | {cells[0]} | {cells[1]} | {took:.0f} | "
                    f"{load[0][0]:.1f}→{load[1][0]:.1f} |")
            print(line, flush=True)
            lines.append(line)
            rows.append({"model": name, "fold": fold, "exact": exact, "sites": len(_sites(name)),
                         "before": {k: b[k] for k in ("longest_path", "params", "flops")},
                         "after": {k: a[k] for k in ("longest_path", "params", "flops")},
                         "relative_output_change": rel, "collapse_s": took, "load": load,
                         "latency": {str(k): v for k, v in lat["batches"].items()},
                         "plan": {k: v for k, v in out.plan.items() if k != "chains"} if out.plan else {},
                         "plan_chains": len(out.plan.get("chains", [])) if out.plan else 0})
            _write(args.out, lines, head, rows)
    lines += ["", f"load average at end {_load()}"]
    _write(args.out, lines, head, rows)


def _write(prefix: str | None, lines: list[str], head: str, rows: list[dict]) -> None:
    """Write what is measured so far (a long run stopped early keeps its rows)."""
    if prefix:
        with open(prefix + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(prefix + ".json", "w") as f:
            json.dump({"header": head, "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
