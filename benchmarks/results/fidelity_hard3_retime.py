"""Quiet re-timing of the MobileNetV2 architectures the digits-hard fidelity run ended with
(random weights: speed needs no training). For every seed in the cache, the sites that
easier-latency and easier removed (their selected inexact rows) are linearised (identity) in a
dense model and collapsed the way that row was (easier-latency: exact=False, fold="auto";
easier: exact=False, fold="always"); then dense vs collapsed at 224x224, batch 1 and 8,
interleaved; and the dense model with its batch norms folded (exact collapse, no site
removed), the speed any deployment gets without removing anything. Both stems: the benchmark's stride-1 stem and torchvision's stride-2 one.

    python benchmarks/results/fidelity_hard3_retime.py   # writes fidelity_hard3_retime.json
    python benchmarks/results/fidelity_hard3_retime.py OUT.json   # writes OUT.json instead

With glibc's allocator told to keep freed memory (no page faults for large activations), as
for ``fidelity_hard3_retime_nofree.json``:

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \
    MALLOC_TOP_PAD_=1073741824 python benchmarks/results/fidelity_hard3_retime.py OUT.json
"""
import copy
import glob
import json
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))  # benchmarks/
import fidelity as F  # noqa: E402

import egp_fast  # noqa: E402
from egp_fast.folding.collapser import compare_latency  # noqa: E402

torch.set_num_threads(2)
FOLDS = {"easier-latency": ("auto_inexact", dict(exact=False, fold="auto")),
         "easier": ("always_inexact", dict(exact=False, fold="always")),
         "dense": ("exact", dict(exact=True, fold="auto"))}  # batch-norm folding alone, for reference

cases: dict[tuple, list[int]] = {}  # (method, sites) -> seeds
for path in sorted(glob.glob(os.path.join(HERE, "fidelity_hard3_cache", "digits-hard_mobilenet_seed*_easier*.json"))):
    for r in json.load(open(path)):
        if r.get("selected") and r["variant"] == FOLDS[r["method"]][0]:
            cases.setdefault((r["method"], tuple(r["removed_sites"])), []).append(r["seed"])
cases[("dense", ())] = sorted({s for seeds in cases.values() for s in seeds})

out = {}
for stem in ("stride-1 stem (the benchmark's)", "stride-2 stem (torchvision's)"):
    for (method, sites), seeds in sorted(cases.items()):
        kw = FOLDS[method][1]
        torch.manual_seed(0)
        dense = F.build(F.model_recipes(False)["mobilenet"], 32 if "stride-1" in stem else 224).eval()
        x = torch.randn(2, 1, 32, 32)
        stats = egp_fast.measure_entropy(dense, [x], progress=False)
        m = copy.deepcopy(dense)
        if sites:
            egp_fast.linearize(m, stats, sites=list(sites), how="identity")
        res = egp_fast.collapse(m, egp_fast.measure_entropy(m, [x], progress=False), x, measure_latency=False, **kw)
        col = res.model.eval()
        row = {"seeds": seeds, "sites": list(sites), "fold": kw}
        for bs in (1, 8):
            xb = torch.randn(bs, 1, 224, 224)
            r = compare_latency(dense, col, xb, batch_sizes=(bs,), budget_s=1e-9, min_rounds=7, max_rounds=7,
                                min_run_s=0.2)["batches"][bs]
            row[f"b{bs}"] = {"dense_ms": round(r["a_ms"], 2), "collapsed_ms": round(r["b_ms"], 2),
                             "speedup": round(r["speedup"], 3), "iqr": [round(v, 3) for v in r["speedup_iqr"]]}
        label = f"{stem} | {method} ({len(sites)} sites, seeds {seeds}), {kw}"
        out[label] = row
        print(label, row["b1"]["speedup"], row["b8"]["speedup"], flush=True)
    for method in FOLDS:  # the median over seeds (one speed-up per seed)
        per_seed = {bs: [] for bs in (1, 8)}
        for (m, sites), seeds in cases.items():
            if m == method:
                row = next(v for k, v in out.items() if k.startswith(stem) and v["sites"] == list(sites)
                           and f"| {method} (" in k)
                for bs in per_seed:
                    per_seed[bs] += [row[f"b{bs}"]["speedup"]] * len(seeds)
        if per_seed[1]:
            out[f"{stem} | {method}: median over seeds"] = {
                f"b{bs}": round(statistics.median(v), 3) for bs, v in per_seed.items()} | {"seeds": len(per_seed[1])}
json.dump(out, open(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "fidelity_hard3_retime.json"), "w"),
          indent=1)
