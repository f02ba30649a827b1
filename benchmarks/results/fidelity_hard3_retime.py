"""Quiet re-timing of the MobileNetV2 architectures the digits-hard fidelity run ended with
(random weights: speed needs no training). Dense model vs the same model with the removed
sites linearised (identity) and collapsed; 224x224, batch 1 and 8, interleaved."""
import sys, json, torch, torch.nn as nn
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), ".."))  # benchmarks/
import fidelity as F
import egp_fast
from egp_fast.folding.collapser import compare_latency
torch.set_num_threads(2)
cases = {
    "easier-latency (4 sites), exact=False fold=auto": (["features.2.conv.0.2", "features.2.conv.1.2", "features.3.conv.0.2", "features.3.conv.1.2"], dict(exact=False, fold="auto")),
    "easier (9 sites), exact=False fold=always": (["features.0.2", "features.1.conv.0.2", "features.2.conv.0.2", "features.2.conv.1.2", "features.3.conv.0.2", "features.3.conv.1.2", "features.4.conv.0.2", "features.5.conv.0.2", "features.6.conv.0.2"], dict(exact=False, fold="always")),
}
out = {}
for stem in ("stride-1 stem (the benchmark's)", "stride-2 stem (torchvision's)"):
    for name, (sites, kw) in cases.items():
        torch.manual_seed(0)
        dense = F.build(F.model_recipes(False)["mobilenet"], 32 if "stride-1" in stem else 224).eval()
        x = torch.randn(2, 1, 32, 32)
        stats = egp_fast.measure_entropy(dense, [x], progress=False)
        import copy
        m = copy.deepcopy(dense)
        egp_fast.linearize(m, stats, sites=sites, how="identity")
        st2 = egp_fast.measure_entropy(m, [x], progress=False)
        res = egp_fast.collapse(m, st2, x, measure_latency=False, **kw)
        col = res.model.eval()
        row = {}
        for bs in (1, 8):
            xb = torch.randn(bs, 1, 224, 224)
            r = compare_latency(dense, col, xb, batch_sizes=(bs,), budget_s=1e-9, min_rounds=7, max_rounds=7, min_run_s=0.2)["batches"][bs]
            row[f"b{bs}"] = {"dense_ms": round(r["a_ms"], 2), "collapsed_ms": round(r["b_ms"], 2), "speedup": round(r["speedup"], 3), "iqr": [round(v, 3) for v in r["speedup_iqr"]]}
        out[f"{stem} | {name}"] = row
        print(stem, "|", name, row, flush=True)
json.dump(out, open(__file__.replace(".py", ".json"), "w"), indent=1)
