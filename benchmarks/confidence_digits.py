"""Issue 13's bars on digits: early stopping and training-time counting against a full pass.

Trains the CIFAR-style ResNet-18 (width 16, 1 input channel, 17 ReLU sites) on scikit-learn's
digits (16x16, 1437 training images), then runs a few EGP rounds with :class:`egp_fast.Pruner`.
Each round compares, on the training split in batches of 64:

(a) ``measure(stop="decided")`` against the full eval-mode pass, with the entropy rule alone
    (``plan_tol=None``) and with the plan rule (the default ``plan_tol=0.01``: the pass also
    waits until every layer's planned amount is known within 1%): the same zero-entropy
    decisions? per-layer pruning amounts of ``plan`` within 1% of the full pass's (strictly,
    and allowing one weight for rounding)? how many batches did it use, how far did the
    entropies move, and what did the plan callback cost?
(b) ``track_entropy`` over one fine-tuning epoch (train-mode forwards, BatchNorm batch
    statistics, weights moving) against the eval-mode pass right after that epoch: how often
    do the zero-entropy decisions and the allocation agree?

Run (about a minute on 2 CPU cores): ``.venv/bin/python benchmarks/confidence_digits.py``;
``--json out.json`` writes the figures. Not a pytest benchmark: it prints a report.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

import egp_fast
from egp_fast.cli.data import load_data
from egp_fast.cli.models import cifar_resnet18
from egp_fast.measurement import track_entropy


def _batches(x: torch.Tensor, y: torch.Tensor, size: int, perm: torch.Tensor | None = None):
    idx = perm if perm is not None else torch.arange(x.shape[0])
    return [(x[idx[i : i + size]], y[idx[i : i + size]]) for i in range(0, x.shape[0], size)]


def _epoch(model, opt, x, y, size, gen, sched=None):
    model.train()
    for xb, yb in _batches(x, y, size, torch.randperm(x.shape[0], generator=gen)):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        if sched is not None:
            sched.step()


@torch.no_grad()
def _accuracy(model, x, y) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def _plan_diff(a: dict[str, int], b: dict[str, int]) -> dict:
    """Per-layer difference of two plans, relative to the reference plan ``b``.

    ``max_rel_diff``: the largest ``|a - b| / b`` (inf when ``b`` is 0 and ``a`` is not);
    ``max_rel_diff_1w``: the same after allowing one weight for rounding down,
    ``max(0, |a - b| - 1) / b``; ``max_abs_diff``: the largest ``|a - b|`` in weights.
    """
    worst, worst_layer, worst_1w, worst_abs = 0.0, None, 0.0, 0
    for k in b:
        ref, got = b[k], a.get(k, 0)
        rel = abs(got - ref) / ref if ref else (0.0 if got == 0 else math.inf)
        rel_1w = max(0, abs(got - ref) - 1) / ref if ref else (0.0 if abs(got) <= 1 else math.inf)
        worst_1w = max(worst_1w, rel_1w)
        worst_abs = max(worst_abs, abs(got - ref))
        if rel > worst:
            worst, worst_layer = rel, k
    top_a = max(a, key=a.get) if a else None
    top_b = max(b, key=b.get) if b else None
    total_b = sum(b.values()) or 1
    moved = sum(abs(a.get(k, 0) - b[k]) for k in b) / 2 / total_b
    return {"max_rel_diff": worst, "worst_layer": worst_layer, "max_rel_diff_1w": worst_1w,
            "max_abs_diff": worst_abs, "same_top_layer": top_a == top_b, "budget_moved": moved}


def _timed_plan_rule(pruner):
    """Make ``pruner.measure`` count the plan callback's calls and seconds (returns the tally)."""
    tally = {"calls": 0, "seconds": 0.0}
    build = type(pruner).plan_rule

    def plan_rule():
        fn = build(pruner)
        if fn is None:
            return None

        def timed(entropy, constant):
            t = time.perf_counter()
            try:
                return fn(entropy, constant)
            finally:
                tally["calls"] += 1
                tally["seconds"] += time.perf_counter() - t

        return timed

    pruner.plan_rule = plan_rule
    return tally


def _early(pruner, data, full, plan_full, **options) -> dict:
    """One ``stop="decided"`` pass against the full pass ``full`` and its plan."""
    tally = _timed_plan_rule(pruner)
    t = time.perf_counter()
    try:
        e = pruner.measure(data, stop="decided", **options)
    finally:
        del pruner.plan_rule
    seconds = time.perf_counter() - t
    return {"batches": e.batches, "stopped_early": e.stopped_early, "samples": e.samples,
            "same_zero": e.zero_entropy_sites() == full.zero_entropy_sites(),
            "max_entropy_diff": _entropy_diff(e, full), "plan": _plan_diff(pruner.plan(e), plan_full),
            "seconds": seconds, "plan_calls": tally["calls"], "plan_seconds": tally["seconds"],
            "max_flip_bound_of_zero_sites": max(
                [e.sites[n].flip_bound() for n in e.zero_entropy_sites()], default=None)}


def _entropy_diff(a, b) -> float:
    return max(abs(a.sites[n].entropy - b.sites[n].entropy) for n in b.sites)


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dense-epochs", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tols", default="0.02,0.005,0.001,0.0002",
                    help="comma-separated tol values for the entropy rule alone (plan_tol=None); the first "
                    "is also the plan rule's tol")
    ap.add_argument("--plan-tols", default="0.01,0.05",
                    help="comma-separated plan_tol values for the plan rule (the first is the reported one)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    t0 = time.perf_counter()
    src = load_data("digits")
    x, y = src.train.x, src.train.y
    xt, yt = src.test.x, src.test.y
    model = cifar_resnet18(10, width=16, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    steps = a.dense_epochs * math.ceil(x.shape[0] / a.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    for _ in range(a.dense_epochs):
        _epoch(model, opt, x, y, a.batch, gen, sched)
    report = {"machine": f"cpu x{torch.get_num_threads()} threads", "dense_acc": _accuracy(model, xt, yt),
              "train_images": int(x.shape[0]), "batch": a.batch, "rounds": []}
    print(f"dense: test accuracy {report['dense_acc']:.3f}")
    data = _batches(x, y, a.batch)  # fixed order: every pass sees the same batches
    pruner = egp_fast.Pruner(model, x[: a.batch], progress=False)
    for rnd in range(a.rounds):
        t = time.perf_counter()
        full = pruner.measure(data)
        full_seconds = time.perf_counter() - t
        plan_full = pruner.plan(full)
        by_tol = []
        for tol in [float(t) for t in a.tols.split(",")]:
            r = _early(pruner, data, full, plan_full, tol=tol, plan_tol=None)
            by_tol.append({"tol": tol, **r})
        by_plan_tol = []
        for plan_tol in [float(t) for t in a.plan_tols.split(",")]:
            r = _early(pruner, data, full, plan_full, tol=float(a.tols.split(",")[0]), plan_tol=plan_tol)
            by_plan_tol.append({"plan_tol": plan_tol, **r})
        entropy_rule, plan_rule = by_tol[0], by_plan_tol[0]
        row = {
            "round": rnd + 1,
            "full_batches": full.batches,
            "full_seconds": full_seconds,
            "zero_full": full.zero_entropy_sites(),
            "plan_full_nonzero_layers": sum(1 for v in plan_full.values() if v),
            "plan_full_smallest": min((v for v in plan_full.values() if v), default=0),
            "entropy_rule": entropy_rule,
            "plan_rule": plan_rule,
            "by_tol": by_tol,
            "by_plan_tol": by_plan_tol,
            # the names of earlier versions of this report: the early pass is the plan rule's
            "decided_batches": plan_rule["batches"],
            "same_zero": plan_rule["same_zero"],
            "max_entropy_diff": plan_rule["max_entropy_diff"],
            "plan": plan_rule["plan"],
        }
        pruner.apply(plan_full, full)
        # fine-tune; the last epoch is counted by track_entropy (train-mode forwards)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        for _ in range(a.finetune_epochs - 1):
            _epoch(model, opt, x, y, a.batch, gen)
        with track_entropy(model, graph=pruner.graph) as tracker:
            _epoch(model, opt, x, y, a.batch, gen)
        tracked = tracker.stats()
        after = pruner.measure(data)
        zt, ze = set(tracked.zero_entropy_sites()), set(after.zero_entropy_sites())
        row.update(
            acc=_accuracy(model, xt, yt),
            sparsity=pruner.sparsity(),
            track_batches=tracker.batches,
            zero_tracked=sorted(zt),
            zero_eval=sorted(ze),
            zero_agree=zt == ze,
            zero_sites_agreeing=sum((n in zt) == (n in ze) for n in after.sites),
            sites=len(after.sites),
            track_max_entropy_diff=_entropy_diff(tracked, after),
            track_plan=_plan_diff(pruner.plan(tracked), pruner.plan(after)),
        )
        report["rounds"].append(row)
        print(
            f"round {rnd + 1}: sparsity {row['sparsity']:.3f} acc {row['acc']:.3f} | track vs eval: zero agree "
            f"{row['zero_sites_agreeing']}/{row['sites']} sites (tracked {len(zt)}, eval {len(ze)}), "
            f"max |dH| {row['track_max_entropy_diff']:.3f}, same top layer "
            f"{row['track_plan']['same_top_layer']}, budget moved {row['track_plan']['budget_moved']:.3f}"
        )
        per_batch = row["full_seconds"] / max(full.batches, 1)
        for label, rows in (("entropy rule, tol", by_tol), ("plan rule, plan_tol", by_plan_tol)):
            for t in rows:
                key = t.get("tol", t.get("plan_tol"))
                cost = (f", plan callback {t['plan_calls']} calls {t['plan_seconds'] * 1e3:.1f} ms "
                        f"(one batch {per_batch * 1e3:.0f} ms)") if t["plan_calls"] else ""
                print(f"    {label} {key:g}: {t['batches']}/{full.batches} batches, same zero {t['same_zero']}, "
                      f"max |dH| {t['max_entropy_diff']:.5f}, plan max rel diff {t['plan']['max_rel_diff']:.4f} "
                      f"({t['plan']['worst_layer']}), with 1 weight slack {t['plan']['max_rel_diff_1w']:.4f}, "
                      f"budget moved {t['plan']['budget_moved']:.4f}{cost}")
        sys.stdout.flush()
    report["seconds"] = time.perf_counter() - t0
    print(f"total {report['seconds']:.1f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return report


if __name__ == "__main__":
    main()
