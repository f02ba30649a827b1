"""Issue 13's bars on digits: early stopping and training-time counting against a full pass.

Trains the CIFAR-style ResNet-18 (width 16, 1 input channel, 17 ReLU sites) on scikit-learn's
digits (16x16, 1437 training images), then runs a few EGP rounds with :class:`egp_fast.Pruner`.
Each round compares, on the training split in batches of 64:

(a) ``measure(stop="decided")`` against the full eval-mode pass: the same zero-entropy
    decisions? per-layer pruning amounts of ``plan`` within 1% of the full pass's? how many
    batches did it use, and how far did the entropies move?
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
import time

import torch
import torch.nn.functional as F

import egp_fast
from egp_fast.data import load_data
from egp_fast.models import cifar_resnet18
from egp_fast.stats import track_entropy


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
    """Per-layer difference of two plans, relative to the reference plan ``b``."""
    worst, worst_layer = 0.0, None
    for k in b:
        ref, got = b[k], a.get(k, 0)
        rel = abs(got - ref) / ref if ref else (0.0 if got == 0 else math.inf)
        if rel > worst:
            worst, worst_layer = rel, k
    top_a = max(a, key=a.get) if a else None
    top_b = max(b, key=b.get) if b else None
    total_b = sum(b.values()) or 1
    moved = sum(abs(a.get(k, 0) - b[k]) for k in b) / 2 / total_b
    return {"max_rel_diff": worst, "worst_layer": worst_layer, "same_top_layer": top_a == top_b,
            "budget_moved": moved}


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
                    help="comma-separated tol values to compare stop='decided' at (the first is reported in the line)")
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
        full = pruner.measure(data)
        plan_full = pruner.plan(full)
        by_tol = []
        for tol in [float(t) for t in a.tols.split(",")]:
            e = pruner.measure(data, stop="decided", tol=tol)
            by_tol.append({"tol": tol, "batches": e.batches, "same_zero": e.zero_entropy_sites() == full.zero_entropy_sites(),
                           "max_entropy_diff": _entropy_diff(e, full), "plan": _plan_diff(pruner.plan(e), plan_full)})
        early = pruner.measure(data, stop="decided", tol=float(a.tols.split(",")[0]))
        plan_early = pruner.plan(early)
        row = {
            "round": rnd + 1,
            "full_batches": full.batches,
            "decided_batches": early.batches,
            "decided_samples": early.samples,
            "stopped_early": early.stopped_early,
            "zero_full": full.zero_entropy_sites(),
            "zero_decided": early.zero_entropy_sites(),
            "same_zero": full.zero_entropy_sites() == early.zero_entropy_sites(),
            "max_entropy_diff": _entropy_diff(early, full),
            "plan": _plan_diff(plan_early, plan_full),
            "by_tol": by_tol,
            "max_flip_bound_of_zero_sites": max(
                [early.sites[n].flip_bound() for n in early.zero_entropy_sites()], default=None
            ),
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
            f"round {rnd + 1}: sparsity {row['sparsity']:.3f} acc {row['acc']:.3f} | stop=decided "
            f"{row['decided_batches']}/{row['full_batches']} batches, same zero-entropy sites "
            f"{row['same_zero']} ({len(row['zero_full'])}), max |dH| {row['max_entropy_diff']:.4f}, "
            f"plan max rel diff {row['plan']['max_rel_diff']:.4f} | track vs eval: zero agree "
            f"{row['zero_sites_agreeing']}/{row['sites']} sites (tracked {len(zt)}, eval {len(ze)}), "
            f"max |dH| {row['track_max_entropy_diff']:.3f}, same top layer "
            f"{row['track_plan']['same_top_layer']}, budget moved {row['track_plan']['budget_moved']:.3f}"
        )
        for t in by_tol:
            print(f"    tol {t['tol']:g}: {t['batches']}/{full.batches} batches, same zero {t['same_zero']}, "
                  f"max |dH| {t['max_entropy_diff']:.5f}, plan max rel diff {t['plan']['max_rel_diff']:.4f} "
                  f"({t['plan']['worst_layer']}), budget moved {t['plan']['budget_moved']:.4f}")
    report["seconds"] = time.perf_counter() - t0
    print(f"total {report['seconds']:.1f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return report


if __name__ == "__main__":
    main()
