"""EASIER on digits: ``linearization="identity"`` vs ``"majority"``, side by side.

Trains one dense CIFAR-style ResNet-18 per seed on scikit-learn's digits (16x16, a stratified
10% of the training split held out for validation), then runs
``egp_fast.prune(method="easier")`` from the same dense weights once per linearisation, with
the same fine-tune schedule. The stop decision uses the validation split only; the test
accuracy of every iteration is recorded on the side, for the report. Writes a JSON file.

Not part of the test suite. Example (about 10 minutes on a quiet 2-core CPU):

    python benchmarks/easier_linearization.py --seeds 0 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time

import torch

import egp_fast
from egp_fast.cli.data import hold_out, load_data
from egp_fast.cli.loader import make_loader
from egp_fast.cli.models import build_model
from egp_fast.cli.train import build_optimizer, build_scheduler, evaluate, train_epoch

CPU = torch.device("cpu")


def _train(model, loader, epochs, lr, seed):
    torch.manual_seed(seed)
    opt = build_optimizer(model, "sgd", lr=lr, momentum=0.9, weight_decay=5e-4)
    sch = build_scheduler(opt, "cosine", epochs=epochs)
    for _ in range(epochs):
        train_epoch(model, loader, opt, device=CPU)
        sch.step()


def run(seed: int, args: argparse.Namespace) -> dict:
    src = hold_out(load_data("digits"), 0.1, seed=seed)
    train = make_loader(src.train, 64, shuffle=True, seed=seed)
    measure = make_loader(src.train_eval, 256)
    val = make_loader(src.val, 256)
    test = make_loader(src.test, 256)
    torch.manual_seed(seed)
    dense = build_model("cifar_resnet18", src.num_classes, in_channels=src.channels, width=args.width)
    t0 = time.perf_counter()
    _train(dense, train, args.dense_epochs, 0.1, seed)
    out = {
        "seed": seed,
        "dense_seconds": time.perf_counter() - t0,
        "dense_val": evaluate(dense, val, device=CPU)["acc"],
        "dense_test": evaluate(dense, test, device=CPU)["acc"],
        "runs": {},
    }
    for how in ("identity", "majority"):
        model = copy.deepcopy(dense)
        tests: list[float] = []

        def finetune(m, i):
            _train(m, train, args.ft_epochs, args.ft_lr, seed + 1000 * (i + 1))

        def val_acc(m, tests=tests):
            tests.append(evaluate(m, test, device=CPU)["acc"])  # recorded, never used to decide
            return evaluate(m, val, device=CPU)["acc"]

        t0 = time.perf_counter()
        res = egp_fast.prune(model, measure, method="easier", linearization=how, evaluate=val_acc,
                             finetune=finetune, max_drop=args.max_drop, iterations=args.iterations,
                             progress=False)
        total = len(res.rounds[0].stats["sites"])
        kept = res.best_round
        out["runs"][how] = {
            "seconds": time.perf_counter() - t0,
            "sites": total,
            "removed": len(res.removed_sites),
            "removed_sites": res.removed_sites,
            "best_round": kept,
            "val": [r.accuracy for r in res.rounds],
            "test": tests[1:],
            "kept": [r.kept for r in res.rounds],
            "per_round_removed": [len(r.removed_sites) for r in res.rounds],
            "final_test": evaluate(model, test, device=CPU)["acc"],
        }
        print(json.dumps({"seed": seed, "how": how, **{k: v for k, v in out["runs"][how].items()
                                                       if k != "removed_sites"}}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--dense-epochs", type=int, default=15)
    ap.add_argument("--ft-epochs", type=int, default=4)
    ap.add_argument("--ft-lr", type=float, default=0.01)
    ap.add_argument("--iterations", type=int, default=17)
    ap.add_argument("--max-drop", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/easier_linearization.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "args": vars(args),
        "seeds": [run(s, args) for s in args.seeds],
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
