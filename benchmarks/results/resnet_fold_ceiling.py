"""How fast can folding make the digits-hard ResNet-18 (width 16, 32x32, batch 64)? Random
weights (speed needs no training): linearise a set of sites (identity), collapse with
exact=False under each fold policy, and time it against the dense model (interleaved, 5 rounds,
2 threads). Sets: the first ReLU of every residual block (8 sites: each block's two 3x3 convs
can then merge into one 5x5), and every site but the stem's and the last (15 of 17).

    python benchmarks/results/resnet_fold_ceiling.py   # writes resnet_fold_ceiling.json
"""
import copy
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))  # benchmarks/
import fidelity as F  # noqa: E402

import egp_fast  # noqa: E402
from egp_fast.folding.collapser import compare_latency  # noqa: E402

torch.set_num_threads(2)
torch.manual_seed(0)
dense = F.build(F.model_recipes(False)["resnet"], 32).eval()
x = torch.randn(64, 1, 32, 32)
stats = egp_fast.measure_entropy(dense, [x[:8]], progress=False)
names = [s.name for s in egp_fast.discover_sites(dense, x[:2]).sites]
sets = {"first ReLU of every block (8 sites)": [n for n in names if n.endswith(".relu1")],
        "every site but the stem's and the last (15 sites)": names[1:-1]}
out = {}
for label, sites in sets.items():
    for fold in ("auto", "latency", "always"):
        m = copy.deepcopy(dense)
        egp_fast.linearize(m, stats, sites=sites, how="identity")
        res = egp_fast.collapse(m, egp_fast.measure_entropy(m, [x[:8]], progress=False), x[:8], exact=False,
                                fold=fold, measure_latency=False)
        r = compare_latency(dense, res.model.eval(), x, batch_sizes=(64,), budget_s=1e-9, min_rounds=5,
                            max_rounds=5, min_run_s=0.2)["batches"][64]
        out[f"{label} | fold={fold}"] = {"dense_ms": round(r["a_ms"], 2), "collapsed_ms": round(r["b_ms"], 2),
                                         "speedup": round(r["speedup"], 3),
                                         "iqr": [round(v, 3) for v in r["speedup_iqr"]]}
        print(label, fold, out[f"{label} | fold={fold}"], flush=True)
json.dump(out, open(os.path.join(HERE, "resnet_fold_ceiling.json"), "w"), indent=1)
