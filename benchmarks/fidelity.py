"""Fidelity benchmark: how much depth each method removes, and at what accuracy (issues 12 and 20).

On scikit-learn's digits (``--task digits``: 16x16, the ``digits`` data of ``egp-fast``) or on
``--task digits-hard`` (the same digits rotated, scaled, moved on a 32x32 canvas with clutter
and noise, test originals held out; see ``egp_fast/cli/digits_hard.py``), for each model, seed
and method, this trains one dense model (shared by every method of that seed), then prunes it:

* ``egp`` and ``imp``: ``rounds`` rounds of 50% (:class:`egp_fast.Pruner`), each followed by
  ``ft_epochs`` epochs of fine-tuning (SGD, lr 0.01, cosine) -- the recipe of docs/algorithm.md's digits figures;
* ``easier``: ``egp_fast.prune(method="easier")`` with ``ft_epochs`` epochs of fine-tuning per
  step and ``max_drop`` accuracy drop allowed on a validation split held out from the training
  data (never the test split);
* ``easier-latency`` (not in the default set): the same with ``objective="latency"`` and
  ``target_speedup`` (latency-aware EASIER: removal groups ranked by the speed they unlock).

After every round/step the model is collapsed (:func:`egp_fast.collapse`, exact folds only, the
headline). The model each method ends with is also collapsed with ``exact=False,
fold="always"`` (labelled ``always_inexact``, with its measured deviation and accuracy right
after the fold), and that collapsed model is then fine-tuned for ``--fold-epochs`` epochs (as
``egp-fast --fold-epochs`` does) and evaluated again. The models each method ends with are
also timed at 224x224, batch 1 and 8 (convolutional models: the collapsed architecture's speed
at a real input size). A multinomial logistic regression on the pixels (its ``C`` chosen on
the validation split) gives each task's linear baseline. Each collapsed model is saved
(``torch.export`` with a dynamic batch, as ``egp-fast`` saves ``collapsed.pt2``), loaded back and
compared with the in-memory one. One row per (model, method, seed, iteration, variant):
test accuracy, sites removed, longest path, parameters, FLOPs, batch-1 and batch-64 latency of
the collapsed model against the uncollapsed one at the task's image size (timed interleaved,
ratio with its spread), exactness and wall time.

Outputs (``--out``, default ``benchmarks/results/fidelity``, ``fidelity_hard`` for digits-hard): ``.json`` (every row, the config,
machine and date), ``.png`` (test accuracy vs sites removed, one line per method, one panel per
model) and ``.md`` (median over seeds per model x method).

Usage::

    python benchmarks/fidelity.py                 # the default run (3 seeds, ~30 min on 2 cores)
    python benchmarks/fidelity.py --quick         # seconds: tiny data and epochs (smoke test)
    python benchmarks/fidelity.py --models resnet --methods easier --seeds 0 --jobs 1 --threads 2
    python benchmarks/fidelity.py --task digits-hard --models resnet mobilenet --seeds 0

Not part of the default test run (``tests/bench/test_fidelity.py`` runs ``--quick``).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = {"digits": os.path.join(ROOT, "benchmarks", "results", "fidelity"),
               "digits-hard": os.path.join(ROOT, "benchmarks", "results", "fidelity_hard")}
TASKS = ("digits", "digits-hard")
IMAGE_SIZE = {"digits": 16, "digits-hard": 32}
MODELS = ("resnet", "vit", "mobilenet")
DEFAULT_MODELS = ("resnet", "vit")
# the order fixes each method's seed (1000 * seed + index): new methods go at the end
METHODS = ("egp", "imp", "easier", "easier-latency")
DEFAULT_METHODS = ("egp", "imp", "easier")
EASIER_METHODS = ("easier", "easier-latency")


# ------------------------------------------------------------------------------------------
# Configuration


def model_recipes(quick: bool) -> dict[str, dict[str, Any]]:
    """Per-model build and training recipe (the recipe of docs/algorithm.md's digits figures; the ViT trains with AdamW)."""
    return {
        # torchvision's MobileNetV2 (width 1.0; --quick: 0.25), random init, its stem taking the
        # task's one grey channel (at stride 1 for images up to 64 px, see build): 35 ReLU6
        # sites, 53 weight layers on the longest path
        "mobilenet": {"name": "mobilenet_v2", "kwargs": {"width_mult": 0.25 if quick else 1.0},
                      "optimizer": "sgd", "dense_lr": 0.05, "ft_lr": 0.005},
        # CIFAR-style ResNet-18 of width 16: 17 ReLU sites (--quick: width 4, same depth)
        "resnet": {"name": "cifar_resnet18", "kwargs": {"width": 4 if quick else 16}, "optimizer": "sgd",
                   "dense_lr": 0.1, "ft_lr": 0.01},
        # the digits ViT: 6 blocks of width 64, MLP 256, 17 tokens (--quick: 2 blocks of width 16).
        # Transformers do not train with SGD at lr 0.1: AdamW at the usual ViT rates.
        "vit": {"name": "digits_vit",
                "kwargs": {"dim": 16, "depth": 2, "heads": 2, "mlp": 32} if quick else {},
                "optimizer": "adamw", "dense_lr": 1e-3, "ft_lr": 1e-4},
    }


def build(recipe: dict[str, Any], image_size: int = 16) -> nn.Module:
    """The recipe's model with random weights, for 10 classes and one input channel."""
    from egp_fast.cli import models as models
    if recipe["name"] == "cifar_resnet18":
        return models.cifar_resnet18(10, in_channels=1, **recipe["kwargs"])
    if recipe["name"] == "mobilenet_v2":
        import torchvision

        net = torchvision.models.mobilenet_v2(weights=None, num_classes=10, **recipe["kwargs"])
        stem = net.features[0][0]
        # Small images get a stride-1 stem, as CIFAR adaptations of MobileNetV2 do: with
        # torchvision's stride 2, a 32x32 image is down to 1x1 in the last stage, and on
        # digits-hard the network stayed at chance (10.4% after 12 epochs, 2026-12-05).
        stride = (1, 1) if image_size <= 64 else stem.stride
        net.features[0][0] = nn.Conv2d(1, stem.out_channels, stem.kernel_size, stride, stem.padding, bias=False)
        return net
    return models.digits_vit(10, in_channels=1, image_size=image_size, **recipe["kwargs"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; --quick: 0)")
    p.add_argument("--task", choices=TASKS, default="digits",
                   help="digits (16x16, the fast demo) or digits-hard (32x32, where depth matters)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(DEFAULT_MODELS),
                   help="resnet (CIFAR ResNet-18, width 16), vit (the digits ViT), mobilenet "
                   "(torchvision mobilenet_v2, width 1.0) (default: resnet vit)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS),
                   help="egp, imp, easier, easier-latency (default: egp imp easier)")
    p.add_argument("--quick", action="store_true", help="tiny data and epochs: a smoke test in seconds")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: cores // jobs)")
    p.add_argument("--jobs", type=int, default=None,
                   help="processes side by side, one per (model, seed) (default: 2, --quick: 1)")
    p.add_argument("--dense-epochs", type=int, default=None, help="dense training epochs (default 15)")
    p.add_argument("--ft-epochs", type=int, default=None, help="fine-tune epochs per round/step (default 8)")
    p.add_argument("--rounds", type=int, default=None, help="egp/imp rounds of 50%% (default 4)")
    p.add_argument("--easier-steps", type=int, default=None,
                   help="cap on easier steps (default: every site of the model)")
    p.add_argument("--max-drop", type=float, default=0.01, help="easier's allowed validation drop (fraction)")
    p.add_argument("--target-speedup", type=float, default=1.5,
                   help="easier-latency's latency budget: stop once the predicted speed-up reaches it")
    p.add_argument("--fold-epochs", type=int, default=None,
                   help="fine-tune epochs of the inexactly collapsed model (default 4; --quick: 1; 0: skip)")
    p.add_argument("--no-224", action="store_true",
                   help="skip timing the collapsed convolutional models at 224x224 (batch 1 and 8)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="validation split held out from the training data (easier's stopping rule)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="samples per split (default: all; --quick: 96)")
    p.add_argument("--no-inexact", action="store_true", help="skip the inexact rows (exact=False: fold='always', or 'auto' for easier-latency)")
    p.add_argument("--cache", default=None,
                   help="folder for dense weights and finished (model, seed, method) rows; a rerun "
                   "reuses them (default: <out>_cache)")
    p.add_argument("--report-only", action="store_true",
                   help="write the outputs from the cache alone (what has finished so far)")
    p.add_argument("--note", default=None, help="a sentence added to the table's header (run conditions)")
    p.add_argument("--out", default=None, help="output prefix (default benchmarks/results/fidelity; "
                   "--quick: a temporary folder)")
    args = p.parse_args(argv)
    q = args.quick
    args.seeds = args.seeds if args.seeds is not None else ([0] if q else [0, 1, 2])
    args.dense_epochs = args.dense_epochs if args.dense_epochs is not None else (1 if q else 15)
    args.ft_epochs = args.ft_epochs if args.ft_epochs is not None else (1 if q else 8)
    args.rounds = args.rounds if args.rounds is not None else (1 if q else 4)
    args.easier_steps = args.easier_steps if args.easier_steps is not None else (1 if q else None)
    args.limit = args.limit if args.limit is not None else (96 if q else None)
    args.fold_epochs = args.fold_epochs if args.fold_epochs is not None else (1 if q else 4)
    args.jobs = args.jobs if args.jobs is not None else (1 if q else 2)
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // args.jobs)
    if args.out is None:
        args.out = (os.path.join(tempfile.mkdtemp(prefix="fidelity_quick_"), "fidelity") if q
                    else DEFAULT_OUT[args.task])
    if args.cache is None:
        args.cache = args.out + "_cache"
    for name in ("dense_epochs", "ft_epochs", "rounds", "jobs", "threads", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.val_fraction < 1:
        p.error(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if not 0 <= args.max_drop < 1:
        p.error(f"--max-drop is a fraction in [0, 1), got {args.max_drop}")
    if args.fold_epochs < 0:
        p.error(f"--fold-epochs must be >= 0, got {args.fold_epochs}")
    if not args.target_speedup > 1:
        p.error(f"--target-speedup is a speed-up above 1 (e.g. 1.5), got {args.target_speedup}")
    return args


# ------------------------------------------------------------------------------------------
# Data, training


class Splits:
    """Train (minus validation), validation (held out from train), test; loaders over them."""

    def __init__(self, seed: int, val_fraction: float, limit: int | None, batch_size: int,
                 task: str = "digits") -> None:
        from egp_fast.cli.data import TensorDataset, hold_out, load_data
        from egp_fast.cli.loader import make_loader

        # The validation split depends on the seed only (not on the method), so every method of a
        # seed stops on the same held-out images. The test split is fixed: scikit-learn digits'
        # 360, or digits-hard's images of its 360 held-out originals (one generated set for
        # every seed, so seeds differ only in training).
        if task == "digits":
            src = load_data("digits", limit=limit)
            x, y = src.train.x, src.train.y
            perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(9000 + seed))
            n_val = max(1, round(val_fraction * len(y)))
            val_idx, tr_idx = perm[:n_val], perm[n_val:]
            self.train = TensorDataset(x[tr_idx].contiguous(), y[tr_idx].contiguous())
            self.val = TensorDataset(x[val_idx].contiguous(), y[val_idx].contiguous())
        else:
            # whole originals go to validation (hold_out keeps an original's images together)
            src = hold_out(load_data(task, limit=limit), val_fraction, seed=9000 + seed)
            self.train, self.val = src.train, src.val
        self.test = src.test
        self.train_loader = make_loader(self.train, batch_size, shuffle=True, seed=seed)
        self.measure_loader = make_loader(self.train, 256)
        self.val_loader = make_loader(self.val, 256)
        self.test_loader = make_loader(self.test, 256)
        self.example = self.test.x[:2].clone()
        self.epoch = 0  # global epoch counter: every epoch of a task sees a new shuffle

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def train(model: nn.Module, splits: Splits, epochs: int, lr: float, optimizer: str) -> None:
    """``epochs`` epochs with a fresh optimizer and a cosine schedule (masks stay enforced)."""
    from egp_fast.cli.train import build_optimizer, build_scheduler, train_epoch

    opt = build_optimizer(model, optimizer, lr=lr, weight_decay=1e-4 if optimizer == "sgd" else 0.05)
    sch = build_scheduler(opt, "cosine", epochs=epochs)
    for _ in range(epochs):
        splits.train_loader.set_epoch(splits.epoch)
        splits.epoch += 1
        train_epoch(model, splits.train_loader, opt, device=torch.device("cpu"))
        sch.step()


def accuracy(model: nn.Module, loader) -> float:
    from egp_fast.cli.train import evaluate

    return float(evaluate(model, loader, device=torch.device("cpu"))["acc"])


def linear_baseline(splits: Splits, cs: tuple[float, ...] = (0.01, 0.1, 1.0)) -> dict[str, Any]:
    """Multinomial logistic regression on the raw (standardised) pixels: how far a linear model gets.

    ``C`` (inverse L2 strength) is chosen on the validation split; the test split only reports.
    Returns ``{"C", "val_accuracy", "test_accuracy", "per_C"}`` or ``{"error"}`` without
    scikit-learn.
    """
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        return {"error": "scikit-learn is not installed"}
    import warnings

    def xy(ds):
        return ds.x.reshape(len(ds), -1).numpy(), ds.y.numpy()

    (xtr, ytr), (xva, yva), (xte, yte) = xy(splits.train), xy(splits.val), xy(splits.test)
    per_c, best = {}, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in cs:
            clf = LogisticRegression(C=c, max_iter=300).fit(xtr, ytr)
            per_c[c] = float(clf.score(xva, yva))
            if best is None or per_c[c] > per_c[best[0]]:
                best = (c, clf)
    return {"C": best[0], "val_accuracy": per_c[best[0]], "test_accuracy": float(best[1].score(xte, yte)),
            "per_C": per_c}


# ------------------------------------------------------------------------------------------
# Measuring one model


def _plain(model: nn.Module) -> nn.Module:
    """The uncollapsed model as it runs: a copy with masks applied and removed."""
    from egp_fast.masks.core import strip_masks

    work = copy.deepcopy(model)
    for m in work.modules():
        mask = getattr(m, "weight_mask", None)
        if isinstance(mask, torch.Tensor) and isinstance(getattr(m, "weight", None), torch.Tensor):
            with torch.no_grad():
                m.weight.mul_(mask.to(m.weight.dtype))
    strip_masks(work)
    return work.eval()


def interleaved_latency(a: nn.Module, b: nn.Module, x: torch.Tensor, rounds: int, min_run_ms: float) -> dict[str, float]:
    """Latency of ``b`` relative to ``a`` at ``x``'s batch size, timed alternately.

    :func:`egp_fast.folding.compare_latency` with ``rounds`` interleaved rounds, each run
    repeating a forward until it lasts ``min_run_ms`` milliseconds or more. Returns the two medians
    per forward, ``ratio`` = b / a (the median of the paired ratios) and its spread (the
    interquartile range of the paired ratios).
    """
    from egp_fast.folding.collapser import compare_latency

    bs = int(x.shape[0])
    row = compare_latency(a, b, x, batch_sizes=(bs,), budget_s=1e-9, min_rounds=rounds, max_rounds=rounds,
                          min_run_s=min_run_ms * 1e-3)["batches"][bs]
    lo, hi = row["speedup_iqr"]
    return {"a_ms": row["a_ms"], "b_ms": row["b_ms"], "ratio": 1.0 / row["speedup"],
            "ratio_min": 1.0 / hi, "ratio_max": 1.0 / lo}


def flops_per_image(model: nn.Module, x1: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.eval()(x1)
    return int(fc.get_total_flops())


def save_and_reload(model: nn.Module, example: torch.Tensor, check: torch.Tensor, fmt: str) -> dict[str, Any]:
    """Save ``model`` to a file, load it back, compare outputs at batch 1 and 64.

    ``fmt="export"`` saves as ``egp-fast`` saves ``collapsed.pt2`` (``torch.export`` with a dynamic
    batch; loads without egp_fast's classes); ``fmt="pickle"`` is ``torch.save(model)`` (cheap: used
    for the intermediate rows).
    """
    model = model.eval()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "collapsed.pt2" if fmt == "export" else "collapsed.pt")
        if fmt == "export":
            batch = torch.export.Dim("batch", min=1, max=4096)
            ep = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(ep, path)
            loaded = torch.export.load(path).module()
        else:
            torch.save(model, path)
            loaded = torch.load(path, weights_only=False)
        size = os.path.getsize(path)
    diffs = []
    with torch.no_grad():
        for n in (1, min(64, check.shape[0])):
            ref = model(check[:n])
            got = loaded(check[:n])
            scale = float(ref.abs().max()) or 1.0
            diffs.append(float((ref - got).abs().max()) / scale)
    return {"format": "torch.export" if fmt == "export" else "torch.save", "bytes": size,
            "max_rel_diff": max(diffs), "ok": max(diffs) <= 1e-5}


@torch.no_grad()
def compare_on(ref: nn.Module, other: nn.Module, loader) -> dict[str, float]:
    """Both models over a split: accuracies, max |out diff| / max |out|, share of changed predictions."""
    ref.eval()
    other.eval()
    num = den = 0.0
    changed = seen = right_a = right_b = 0
    for x, y in loader:
        a, b = ref(x), other(x)
        num = max(num, float((a - b).abs().max()))
        den = max(den, float(a.abs().max()))
        changed += int((a.argmax(1) != b.argmax(1)).sum())
        right_a += int((a.argmax(1) == y).sum())
        right_b += int((b.argmax(1) == y).sum())
        seen += x.shape[0]
    seen = max(seen, 1)
    return {"acc_ref": right_a / seen, "acc_other": right_b / seen,
            "relative_deviation": num / den if den else num, "predictions_changed": changed / seen}


def measure(model: nn.Module, splits: Splits, *, variant: str, x1: torch.Tensor,
            keep: dict | None = None) -> dict[str, Any]:
    """Collapse ``model`` (variant ``exact``, ``always_inexact`` or ``auto_inexact``) and measure
    the row's numbers.

    The collapsed model goes into ``keep["model"]`` and the uncollapsed one into
    ``keep["plain"]`` when ``keep`` is given (for a later ``torch.export`` round trip, the
    fold-finetune and the 224x224 timing of the rows a method ends with).
    """
    import egp_fast

    t0 = time.perf_counter()
    plain = _plain(model)
    try:
        stats = egp_fast.measure_entropy(plain, splits.measure_loader, progress=False)
    except egp_fast.ModelError:
        # Every activation was removed (EASIER's last step): nothing to measure, but the affine
        # layers the removed sites left behind still fold.
        stats = egp_fast.EntropyStats({}, "exact", 0)
    kwargs = {"exact": {"exact": True, "fold": "auto"}, "always_inexact": {"exact": False, "fold": "always"},
              "auto_inexact": {"exact": False, "fold": "auto"}}[variant]
    res = egp_fast.collapse(plain, stats, splits.example, measure_latency=False, **kwargs)
    collapsed = res.model.eval()
    cmp = compare_on(plain, collapsed, splits.test_loader)
    x64 = splits.test.x[:64].clone()
    lat1 = interleaved_latency(plain, collapsed, x1, rounds=3, min_run_ms=5)
    lat64 = interleaved_latency(plain, collapsed, x64, rounds=3, min_run_ms=5)
    reload = save_and_reload(collapsed, splits.example, x64, "pickle")
    if keep is not None:
        keep["model"], keep["plain"] = collapsed, plain
    return {
        "variant": variant,
        "accuracy_uncollapsed": cmp["acc_ref"],
        "collapsed_accuracy": cmp["acc_other"],
        "relative_deviation_test": cmp["relative_deviation"],
        "predictions_changed_test": cmp["predictions_changed"],
        "sites_left": res.after.get("sites"),
        "removed_sites": res.removed_sites,
        "weak_sites_left": list(getattr(res, "weak_sites", []) or []),
        "longest_path": res.after.get("longest_path"),
        "longest_path_uncollapsed": res.before.get("longest_path"),
        "params": res.after.get("params"),
        "nonzero_params": res.after.get("nonzero_params"),
        "params_uncollapsed": res.before.get("params"),
        "flops": flops_per_image(collapsed, x1),
        "flops_uncollapsed": flops_per_image(plain, x1),
        "latency_ms_b1": lat1["b_ms"], "latency_ms_b1_uncollapsed": lat1["a_ms"],
        "latency_ratio_b1": lat1["ratio"], "latency_ratio_b1_spread": [lat1["ratio_min"], lat1["ratio_max"]],
        "latency_ms_b64": lat64["b_ms"], "latency_ms_b64_uncollapsed": lat64["a_ms"],
        "latency_ratio_b64": lat64["ratio"],
        "latency_ratio_b64_spread": [lat64["ratio_min"], lat64["ratio_max"]],
        "exact": bool(res.exact),
        "folds": sorted({e["kind"] for e in res.removed}),
        "left": [{k: v for k, v in e.items() if k in ("site", "kind", "reason")} for e in res.left][:40],
        "reload": reload,
        "collapse_s": time.perf_counter() - t0,
    }


def fold_finetune(collapsed: nn.Module, splits: Splits, epochs: int, lr: float, optimizer: str) -> dict[str, Any]:
    """Fine-tune a copy of the collapsed model itself, as ``egp-fast --fold-epochs`` does.

    The collapsed model has no BatchNorm left (folded into the convolutions), so, like the
    command, it trains at a tenth of the fine-tune learning rate (``lr`` is that rate). Returns
    the test and validation accuracies after ``epochs`` epochs and the time taken.
    """
    t0 = time.perf_counter()
    work = copy.deepcopy(collapsed)
    for p in work.parameters():
        p.requires_grad_(True)
    work.train()
    train(work, splits, epochs, lr / 10, optimizer)
    work.eval()
    return {"fold_epochs": epochs, "fold_lr": lr / 10, "fold_finetune_accuracy": accuracy(work, splits.test_loader),
            "fold_finetune_val_accuracy": accuracy(work, splits.val_loader),
            "fold_finetune_s": time.perf_counter() - t0}


def latency_224(plain: nn.Module, collapsed: nn.Module, channels: int = 1) -> dict[str, Any]:
    """Collapsed vs uncollapsed at 224x224, batch 1 and 8, timed interleaved (convolutional models).

    Convolutional models run at any input size, so the architecture a method ends with (found
    on the task's small images) can be timed where depth costs what it costs on real images.
    """
    out: dict[str, Any] = {}
    for bs in (1, 8):
        x = torch.randn(bs, channels, 224, 224, generator=torch.Generator().manual_seed(bs))
        lat = interleaved_latency(plain, collapsed, x, rounds=3, min_run_ms=5)
        out.update({f"latency_ms_224_b{bs}": lat["b_ms"], f"latency_ms_224_b{bs}_uncollapsed": lat["a_ms"],
                    f"latency_ratio_224_b{bs}": lat["ratio"],
                    f"latency_ratio_224_b{bs}_spread": [lat["ratio_min"], lat["ratio_max"]]})
    return out


# ------------------------------------------------------------------------------------------
# One task: a (model, seed) pair, every method on the same dense model


def _silence() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("egp_fast").setLevel(logging.ERROR)


# Rows of the method in progress are also written here as they come, so --report-only can show a
# method that has not finished (marked partial).
_PARTIAL: dict[str, Any] = {"path": None}


def _save_partial(rows: list[dict[str, Any]]) -> None:
    if _PARTIAL["path"]:
        with open(_PARTIAL["path"], "w") as f:
            json.dump(rows, f, default=str)


def _cache_path(cache: str, model: str, seed: int, what: str, ext: str = "json", task: str = "digits") -> str:
    prefix = "" if task == "digits" else f"{task}_"
    return os.path.join(cache, f"{prefix}{model}_seed{seed}_{what}.{ext}")


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    """Train the dense model of one (model, seed), then run every method on a copy of it.

    With a cache folder, the dense weights and each method's rows are stored there as they are
    done, and found there on a rerun (``--report-only`` builds the outputs from them alone).
    """
    _silence()
    torch.set_num_threads(task["threads"])
    import egp_fast

    model_key, seed, cfg, cache = task["model"], task["seed"], task["cfg"], task["cache"]
    data = cfg.get("task", "digits")
    recipe = model_recipes(cfg["quick"])[model_key]
    torch.manual_seed(seed)
    splits = Splits(seed, cfg["val_fraction"], cfg["limit"], cfg["batch_size"], data)
    try:
        dense = build(recipe, IMAGE_SIZE[data])
    except Exception as e:
        return {"rows": [], "errors": [f"{model_key}: cannot build {recipe['name']!r}: {e}"], "splits": splits.sizes()}
    x1 = splits.test.x[:1].clone()
    dense_file = _cache_path(cache, model_key, seed, "dense", "pt", data)
    if os.path.exists(dense_file):
        saved = torch.load(dense_file, weights_only=True)
        dense.load_state_dict(saved["state_dict"])
        dense_s, splits.epoch = saved["seconds"], saved["epoch"]
    else:
        t0 = time.perf_counter()
        train(dense, splits, cfg["dense_epochs"], recipe["dense_lr"], recipe["optimizer"])
        dense_s = time.perf_counter() - t0
        torch.save({"state_dict": dense.state_dict(), "seconds": dense_s, "epoch": splits.epoch}, dense_file)
    dense_acc = accuracy(dense, splits.test_loader)
    dense_val = accuracy(dense, splits.val_loader)
    sites_total = len(egp_fast.discover_sites(dense, splits.example).sites)
    base = {"model": model_key, "arch": recipe["name"], "task": data, "seed": seed, "dense_accuracy": dense_acc,
            "dense_val_accuracy": dense_val, "sites_total": sites_total, "threads": task["threads"]}

    def row(method: str, iteration: int, model: nn.Module, wall: float, variant: str = "exact",
            extra: dict | None = None, keep: dict | None = None) -> dict[str, Any]:
        r = dict(base, method=method, iteration=iteration, wall_s=wall)
        r["val_accuracy"] = accuracy(model, splits.val_loader)
        r.update(extra or {})
        r.update(measure(model, splits, variant=variant, x1=x1, keep=keep))
        # Exact rows: the model's own test accuracy. The inexact fold changes the outputs, so
        # its row reports the accuracy of the collapsed model.
        r["accuracy"] = r["accuracy_uncollapsed"] if variant == "exact" else r["collapsed_accuracy"]
        r["drop_pt"] = 100.0 * (dense_acc - r["accuracy"])
        r["sites_removed"] = sites_total - int(r["sites_left"])
        return r

    def export_check(r: dict, collapsed: nn.Module) -> None:
        try:
            r["reload_export"] = save_and_reload(collapsed, splits.example, splits.test.x[:64], "export")
        except Exception as e:  # recorded, and counted as a failed reload in the table
            r["reload_export"] = {"format": "torch.export", "ok": False, "error": f"{type(e).__name__}: {e}"[:300]}

    def finals(r: dict, keep: dict) -> None:
        """What only the model a method ends with gets: export round trip, 224x224 timing."""
        export_check(r, keep["model"])
        if recipe["name"] != "digits_vit" and not cfg.get("no_224"):  # the ViT's positions fix its size
            r.update(latency_224(keep["plain"], keep["model"]))

    def inexact(method: str, iteration: int, model: nn.Module, wall: float, extra: dict | None = None) -> dict:
        """The inexact row of a final model, then --fold-epochs on the collapsed model:
        ``always_inexact``, or for ``easier-latency``, whose removals were chosen for the merges
        the FLOPs plan makes, ``auto_inexact`` (``exact=False, fold="auto"``)."""
        keep: dict = {}
        variant = "auto_inexact" if method == "easier-latency" else "always_inexact"
        r = row(method, iteration, model, wall, variant=variant, extra=extra, keep=keep)
        if cfg.get("fold_epochs", 0) > 0:
            try:
                r.update(fold_finetune(keep["model"], splits, cfg["fold_epochs"], recipe["ft_lr"],
                                       recipe["optimizer"]))
                r["fold_finetune_drop_pt"] = 100.0 * (dense_acc - r["fold_finetune_accuracy"])
            except Exception as e:  # recorded in the row (its column shows "-"); the method's rows stand
                r["fold_finetune_error"] = f"{type(e).__name__}: {e}"[:300]
        finals(r, keep)
        return r

    ctx = {"row": row, "finals": finals, "inexact": inexact}
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    dense_rows_file = _cache_path(cache, model_key, seed, "dense", task=data)
    if os.path.exists(dense_rows_file):
        with open(dense_rows_file) as f:
            rows.extend(json.load(f))
    else:
        keep: dict = {}
        r = row("dense", 0, dense, dense_s, keep=keep)
        finals(r, keep)
        rows.append(r)
        with open(dense_rows_file, "w") as f:
            json.dump([r], f, default=str)
    for method in cfg["methods"]:
        done = _cache_path(cache, model_key, seed, method, task=data)
        if os.path.exists(done):
            with open(done) as f:
                rows.extend(json.load(f))
            continue
        model = copy.deepcopy(dense)
        torch.manual_seed(1000 * seed + METHODS.index(method))
        _PARTIAL["path"] = _cache_path(cache, model_key, seed, method, "partial.json", data)
        t0 = time.perf_counter()
        try:
            if method in ("egp", "imp"):
                got = _run_rounds(method, model, splits, cfg, recipe, ctx, t0)
            else:
                got = _run_easier(method, model, splits, cfg, recipe, ctx, t0)
        except Exception:
            errors.append(f"{model_key} seed {seed} {method}: {traceback.format_exc()[-3000:]}")
            continue
        with open(done, "w") as f:
            json.dump(got, f, default=str)
        if os.path.exists(_PARTIAL["path"]):
            os.remove(_PARTIAL["path"])
        rows.extend(got)
    return {"rows": rows, "errors": errors, "splits": splits.sizes()}


def _run_rounds(method, model, splits, cfg, recipe, ctx, t0) -> list[dict[str, Any]]:
    """``rounds`` x (Pruner.round, fine-tune); a row after each; the last one also gets the finals.

    The finals: export round trip and 224x224 timing, and the ``always_inexact`` row with its
    fold-finetune.
    """
    import egp_fast

    row = ctx["row"]
    out = []
    measure_s = 0.0  # time spent measuring rows, kept out of the method's wall time
    pruner = egp_fast.Pruner(model, splits.example, step=0.5, method=method, progress=False)
    keep: dict = {}
    for i in range(cfg["rounds"]):
        rec = pruner.round(splits.measure_loader)
        train(model, splits, cfg["ft_epochs"], recipe["ft_lr"], recipe["optimizer"])
        t = time.perf_counter()
        out.append(row(method, i + 1, model, t - t0 - measure_s, extra={"sparsity": rec.sparsity}, keep=keep))
        _save_partial(out)
        measure_s += time.perf_counter() - t
        if rec.pruned == 0:
            break
    ctx["finals"](out[-1], keep)
    last = out[-1]
    if not cfg["no_inexact"]:
        out.append(ctx["inexact"](method, last["iteration"], model, last["wall_s"],
                                  extra={"sparsity": last["sparsity"]}))
    for r in out:
        r["selected"] = r["iteration"] == last["iteration"]
    return out


def _prune_easier(method, model, splits, cfg, **kw):
    """``egp_fast.prune(method="easier")``; ``easier-latency`` adds ``objective="latency"``."""
    import egp_fast

    if method == "easier":
        return egp_fast.prune(model, splits.measure_loader, method="easier", **kw)
    try:
        # exact=False: the merges that pay on a CNN (an inverted residual into one dense 3x3
        # conv) compose zero-padded convs, exact only away from the border; the fold-finetune
        # of the auto_inexact row recovers the border error.
        return egp_fast.prune(model, splits.measure_loader, method="easier", objective="latency",
                              target_speedup=cfg["target_speedup"], exact=False, **kw)
    except TypeError as e:
        if "objective" not in str(e) and "target_speedup" not in str(e):
            raise
        raise RuntimeError(
            "easier-latency needs latency-aware EASIER, egp_fast.prune(method='easier', objective='latency', "
            f"target_speedup=...), which this egp_fast does not have ({e}); run the other methods "
            "(--methods egp imp easier) or update egp_fast") from None


def _run_easier(method, model, splits, cfg, recipe, ctx, t0) -> list[dict[str, Any]]:
    """EASIER (``method``: ``easier`` or ``easier-latency``); every step's model is measured from
    its ``evaluate`` call.

    Each step gets an exact-collapse row; the step the loop returns also gets the finals (export
    round trip, 224x224 timing) and the ``exact=False, fold="always"`` row (from a copy of that
    step's model) with its fold-finetune.
    """
    import egp_fast

    row = ctx["row"]
    out: list[dict[str, Any]] = []
    kept: dict[int, nn.Module] = {}
    models: dict[int, nn.Module] = {}
    walls: dict[int, float] = {}
    measure_s = [0.0]
    calls = [0]

    def finetune(m: nn.Module, step: int) -> None:
        train(m, splits, cfg["ft_epochs"], recipe["ft_lr"], recipe["optimizer"])

    def evaluate(m: nn.Module) -> float:
        acc = accuracy(m, splits.val_loader)
        calls[0] += 1
        if calls[0] == 1:
            return acc  # the loop's dense reference: already the dense row
        step = calls[0] - 1
        t = time.perf_counter()
        walls[step] = t - t0 - measure_s[0]
        keep: dict = {}
        out.append(row(method, step, m, walls[step], keep=keep))
        kept[step] = keep
        models[step] = _plain(m)
        _save_partial(out)
        measure_s[0] += time.perf_counter() - t
        return acc

    steps = cfg["easier_steps"] or len(egp_fast.discover_sites(model, splits.example).sites)
    result = _prune_easier(method, model, splits, cfg, evaluate=evaluate, max_drop=cfg["max_drop"],
                           finetune=finetune, iterations=steps, progress=False)
    # best_round indexes result.rounds (-1: the dense model itself); our step k is round k - 1.
    chosen = int(result.best_round) + 1
    if chosen in models:
        ctx["finals"](next(r for r in out if r["iteration"] == chosen), kept[chosen])
        if not cfg["no_inexact"]:
            out.append(ctx["inexact"](method, chosen, models[chosen], walls[chosen]))
    for r in out:
        r["selected"] = r["iteration"] == chosen
        r["returned_step"] = chosen
        k = r["iteration"] - 1
        r["kept_by_loop"] = bool(result.rounds[k].kept) if k < len(result.rounds) else None
    return out


# ------------------------------------------------------------------------------------------
# Summary: table, plot


def _from_cache(task: dict[str, Any]) -> dict[str, Any]:
    """The finished rows of one (model, seed) in the cache, and which methods are missing."""
    rows: list[dict[str, Any]] = []
    missing = []
    data = task["cfg"].get("task", "digits")
    for what in ["dense", *task["cfg"]["methods"]]:
        path = _cache_path(task["cache"], task["model"], task["seed"], what, task=data)
        partial = _cache_path(task["cache"], task["model"], task["seed"], what, "partial.json", data)
        if os.path.exists(path):
            with open(path) as f:
                rows.extend(json.load(f))
        elif os.path.exists(partial):
            with open(partial) as f:
                got = [dict(r, partial=True) for r in json.load(f)]
            rows.extend(got)
            missing.append(f"{task['model']} seed {task['seed']} {what}: not finished; "
                           f"{len(got)} rows so far (marked partial; no step selected yet)")
        else:
            missing.append(f"{task['model']} seed {task['seed']} {what}: not finished (not in the cache)")
    cfg = task["cfg"]
    return {"rows": rows, "errors": missing,
            "splits": Splits(task["seed"], cfg["val_fraction"], cfg["limit"], cfg["batch_size"], data).sizes()}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(xs) if xs else None


def selected_rows(rows: list[dict[str, Any]], model: str, method: str, variant: str = "exact",
                  max_drop: float = 0.01) -> list[dict]:
    """One row per seed: egp/imp's last round; easier's (and easier-latency's) returned step; dense's only row."""
    out = []
    for seed in sorted({r["seed"] for r in rows if r["model"] == model}):
        mine = [r for r in rows if r["model"] == model and r["method"] == method and r["seed"] == seed
                and r["variant"] == variant]
        if not mine:
            continue
        if method in EASIER_METHODS:
            sel = [r for r in mine if r.get("selected")]
            if not sel and any(r.get("partial") for r in mine):
                # unfinished run: apply the loop's rule to the steps done so far
                sel = _validation_stop(mine, max_drop)
            if sel:
                out.append(sel[0])
            else:  # the loop returned the dense model (its first step was already outside the tolerance)
                dense = [r for r in rows if r["model"] == model and r["method"] == "dense" and r["seed"] == seed]
                out.extend(dict(d, method=method, variant=variant, iteration=0) for d in dense[:1])
        else:
            out.append(max(mine, key=lambda r: r["iteration"]))
    return out


def _validation_stop(mine: list[dict], max_drop: float) -> list[dict]:
    """EASIER's stopping rule on saved rows: the last step before the first one whose validation
    accuracy is more than ``max_drop`` below the dense model's (``[]``: already the first)."""
    sel: list[dict] = []
    for r in sorted(mine, key=lambda r: r["iteration"]):
        if r["dense_val_accuracy"] - r["val_accuracy"] > max_drop + 1e-12:
            break
        sel = [r]
    return sel


def validation_stop_rows(rows: list[dict[str, Any]], model: str, method: str,
                         max_drop: float = 0.01) -> list[dict]:
    """egp/imp with EASIER's validation stop, one exact row per seed: the last round before the
    first one outside the tolerance on the validation split; the dense row when round 1 already is."""
    out = []
    for seed in sorted({r["seed"] for r in rows if r["model"] == model}):
        mine = [r for r in rows if r["model"] == model and r["method"] == method and r["seed"] == seed
                and r["variant"] == "exact"]
        if not mine:
            continue
        sel = _validation_stop(mine, max_drop)
        if not sel:
            sel = [dict(d, method=method, iteration=0) for d in rows
                   if d["model"] == model and d["method"] == "dense" and d["seed"] == seed][:1]
        out.extend(sel)
    return out


def _validation_stop_lines(report: dict[str, Any]) -> list[str]:
    rows, cfg = report["rows"], report["config"]
    methods = [m for m in cfg["methods"] if m not in EASIER_METHODS]
    body = []
    for model in cfg["models"]:
        for method in methods:
            sel = validation_stop_rows(rows, model, method, cfg["max_drop"])
            if not sel:
                continue
            seeds = "; ".join(f"{r['iteration']}: {r['sites_removed']}, {r['drop_pt']:+.1f}" for r in sel)
            body.append(
                f"| {model} | {method} | {seeds} | {_median([r['sites_removed'] for r in sel]):g}/"
                f"{sel[0]['sites_total']} | {_median([r['drop_pt'] for r in sel]):+.1f} | "
                f"{_fmt(_median([r.get('longest_path') for r in sel]), 'g', '')} |")
    if not body:
        return []
    return [
        "", f"egp and imp with EASIER's validation stop (exact folds): the last round before the first "
        f"one more than {100 * cfg['max_drop']:g} pt below the dense model on the validation split, "
        "the dense model when round 1 already is. Per seed: round, sites removed, test drop (pt).", "",
        "| model | method | per seed (round: sites, drop) | sites removed | drop (pt) | longest path |",
        "|---|---|---|---:|---:|---:|", *body]


def best_within(rows: list[dict[str, Any]], model: str, method: str, seed: int, max_pt: float = 1.0) -> int:
    """Most sites removed by any exact row of this seed within ``max_pt`` test drop (0: none)."""
    cands = [r["sites_removed"] for r in rows if r["model"] == model and r["method"] == method
             and r["seed"] == seed and r["variant"] == "exact" and r["drop_pt"] <= max_pt + 1e-9]
    return max(cands, default=0)


def _task_title(task: str) -> str:
    return {"digits": "digits 16x16", "digits-hard": "digits-hard 32x32"}.get(task, task)


def _linear_line(report: dict[str, Any]) -> str:
    lin = report.get("linear") or {}
    if "test_accuracy" not in lin:
        return f"Linear baseline: not available ({lin.get('error', 'not computed')})."
    dense = [r["accuracy"] for r in report["rows"] if r["method"] == "dense"]
    gap = (f" The dense models score {100 * min(dense):.1f}-{100 * max(dense):.1f}%, "
           f"{100 * (_median(dense) - lin['test_accuracy']):.1f} points above it (median)." if dense else "")
    return (f"Linear baseline: a multinomial logistic regression on the pixels (C={lin['C']:g}, chosen on "
            f"validation) scores {100 * lin['test_accuracy']:.1f}% on test ({100 * lin['val_accuracy']:.1f}% on "
            f"validation).{gap}")


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    cfg = report["config"]
    mach = report["machine"]
    task = cfg.get("task", "digits")
    lines = [
        f"# Fidelity benchmark: depth removed vs accuracy ({_task_title(task)})",
        "",
        (f"Assembled by `python benchmarks/fidelity.py {' '.join(report['argv'])}` on {report['date']} from "
         "the rows that runs with the same options had finished (cache); "
         if cfg.get("report_only") else
         f"Generated by `python benchmarks/fidelity.py {' '.join(report['argv'])}` on {report['date']} "
         f"({report['wall_s'] / 60:.1f} min). ") + f"Machine: {mach['cpu']}, {mach['cores']} cores, torch "
        f"{mach['torch']}; {cfg['jobs']} processes side by side with {cfg['threads']} thread(s) each; "
        f"load average at start {', '.join(f'{v:.1f}' for v in report['load_start'])}, at end "
        f"{', '.join(f'{v:.1f}' for v in report['load_end'])}. The machine was shared with other "
        "work during the run, so latencies are noisy; ratios were timed interleaved (collapsed vs "
        "uncollapsed alternately, 3 rounds) and the ratio spread over rounds is in the JSON."
        + (f" {cfg['note']}" if cfg.get("note") else ""),
        "",
        f"Recipe: {cfg['dense_epochs']} dense epochs (cosine), egp/imp {cfg['rounds']} rounds of 50% with "
        f"{cfg['ft_epochs']} fine-tune epochs each; easier {cfg['ft_epochs']} fine-tune epochs per step, "
        f"stop at {100 * cfg['max_drop']:g} pt drop on a validation split of {report['splits'].get('val', '?')} "
        f"images held out from the training data (train {report['splits'].get('train', '?')}, "
        f"test {report['splits'].get('test', '?')}, reported only"
        + ("; digits-hard's validation and test images come from originals never seen in training"
           if task == "digits-hard" else "") + f"). Seeds {cfg['seeds']}."
        + (f" The inexactly collapsed models are fine-tuned for {cfg['fold_epochs']} epochs "
           "(`fold-ft`, at a tenth of the fine-tune rate, as `egp-fast --fold-epochs`)."
           if cfg.get("fold_epochs") else ""),
        "",
        _linear_line(report),
        "",
        "Per model x method, the median over seeds of the model each method ends with (egp/imp: the "
        "last round; easier: the step it returned, chosen on validation). Drop: test accuracy vs the "
        "same seed's dense model, in points. Latency ratio: collapsed / uncollapsed time (below 1 is "
        "faster). `exact`: every fold exact (outputs equal up to rounding); `always_inexact`: "
        "`collapse(exact=False, fold=\"always\")`, which also composes zero-padded convs (border "
        "error), its accuracy is that of the collapsed model right after the fold, and `fold-ft` that "
        "of the same collapsed model after its fine-tune; `auto_inexact` (easier-latency's inexact "
        "row): `exact=False, fold=\"auto\"`, only the merges that save FLOPs, which its removals "
        "were chosen to unlock. `best <= 1 pt` lists per seed the most "
        "sites removed by any step within 1 pt on the test split (an oracle pick, for reference). "
        "Latency b1/b64 at the task's image size; 224 b1/b8: the same two models at 224x224 "
        "(convolutional models only).",
        "",
        "| model | method | variant | dense acc | acc | drop (pt) | fold-ft acc (drop) | sites removed "
        "| best <= 1 pt (per seed) | longest path | params | FLOPs/img | latency b1 | latency b64 "
        "| 224 b1 | 224 b8 | exact | reloads (export) |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for model in cfg["models"]:
        for method in ["dense", *cfg["methods"]]:
            for variant in ("exact", "always_inexact", "auto_inexact"):
                sel = selected_rows(rows, model, method, variant, cfg["max_drop"])
                if not sel:
                    continue
                label = method + (" (unfinished)" if any(r.get("partial") for r in sel) else "")
                total = sel[0]["sites_total"]
                best = [best_within(rows, model, method, r["seed"]) for r in sel] if variant == "exact" else []

                def med(key, sel=sel):
                    return _median([r.get(key) for r in sel])

                ft = med("fold_finetune_accuracy")
                ft_cell = "-" if ft is None else f"{100 * ft:.1f} ({med('fold_finetune_drop_pt'):+.1f})"
                lines.append(
                    f"| {model} | {label} | {variant} | {100 * med('dense_accuracy'):.1f} | "
                    f"{100 * med('accuracy'):.1f} | {med('drop_pt'):+.1f} | {ft_cell} | "
                    f"{med('sites_removed'):g}/{total} | {', '.join(str(b) for b in best) or '-'} | "
                    f"{med('longest_path'):g} (of {med('longest_path_uncollapsed'):g}) | "
                    f"{med('params') / 1e3:.0f}k | {med('flops') / 1e6:.2f}M | "
                    f"{med('latency_ratio_b1'):.2f}x | {med('latency_ratio_b64'):.2f}x | "
                    f"{_fmt(med('latency_ratio_224_b1'), '.2f', 'x')} | {_fmt(med('latency_ratio_224_b8'), '.2f', 'x')} | "
                    f"{sum(bool(r['exact']) for r in sel)}/{len(sel)} "
                    f"(dev {max(r['relative_deviation_test'] for r in sel):.1e}) | "
                    f"{sum(bool(r.get('reload_export', {}).get('ok')) for r in sel)}/{len(sel)} |")
    lines += _validation_stop_lines(report)
    if report["errors"]:
        lines += ["", "Not finished or failed (rows missing or partial):", ""]
        lines += [f"- {e.strip()}" if len(e.strip().splitlines()) == 1
                  else f"- {e.splitlines()[0]} ... {e.strip().splitlines()[-1]}" for e in report["errors"]]
    pickled = [bool(r["reload"]["ok"]) for r in rows]
    exported = [bool(r["reload_export"]["ok"]) for r in rows if "reload_export" in r]
    lines += ["", f"Reloads: every collapsed model ({len(pickled)}) was saved with `torch.save` and loaded back: "
              f"{sum(pickled)} matched to 1e-5 relative at batch 1 and 64. The models each method ends with "
              f"(and the dense ones, {len(exported)}) were also saved as `egp-fast` saves `collapsed.pt2` "
              f"(torch.export, dynamic batch) and loaded back: {sum(exported)} matched."]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = report["rows"]
    models = [m for m in report["config"]["models"] if any(r["model"] == m for r in rows)]
    if not models:
        return False
    colors = {"egp": "tab:blue", "imp": "tab:orange", "easier": "tab:green", "easier-latency": "tab:red"}
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        dense = [r for r in rows if r["model"] == model and r["method"] == "dense"]
        for method in report["config"]["methods"]:
            mine = [r for r in rows if r["model"] == model and r["method"] == method and r["variant"] == "exact"]
            seeds = sorted({r["seed"] for r in mine})
            for seed in seeds:
                d = [r for r in dense if r["seed"] == seed]
                pts = sorted((r["iteration"], r["sites_removed"], 100 * r["accuracy"]) for r in mine
                             if r["seed"] == seed)
                if d:
                    pts = [(0, 0, 100 * d[0]["accuracy"]), *pts]
                ax.plot([p[1] for p in pts], [p[2] for p in pts], "-o", color=colors[method], alpha=0.5,
                        ms=3, lw=1, label=method if seed == seeds[0] else None)
            for r in selected_rows(rows, model, method, "exact", report["config"]["max_drop"]):
                ax.plot([r["sites_removed"]], [100 * r["accuracy"]], "*", color=colors[method], ms=12,
                        mec="black", mew=0.5)
        if dense:
            ax.axhline(100 * statistics.median(r["accuracy"] for r in dense) - 1.0, color="grey", ls=":",
                       lw=1, label="median dense - 1 pt")
        total = dense[0]["sites_total"] if dense else None
        ax.set_title(f"{model} on {_task_title(report['config'].get('task', 'digits'))}"
                     + (f" ({total} sites)" if total else ""))
        ax.set_xlabel("sites removed (collapsed, exact folds)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"Test accuracy vs sites removed after each round/step, one line per seed; star: the model "
                 f"the method ends with ({report['date'][:10]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------
# Main


def _linear_cached(args: argparse.Namespace, cfg: dict[str, Any]) -> dict[str, Any]:
    """The task's linear baseline (seed 0's splits), kept in the cache; ``--report-only`` only reads it."""
    path = os.path.join(args.cache, f"{args.task}_linear_limit{args.limit}_val{args.val_fraction}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    if args.report_only:
        return {"error": "not computed yet (run without --report-only)"}
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    got = linear_baseline(Splits(0, args.val_fraction, args.limit, args.batch_size, args.task))
    got["seconds"] = time.perf_counter() - t0
    with open(path, "w") as f:
        json.dump(got, f)
    return got


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    cfg = {k: getattr(args, k) for k in ("task", "seeds", "models", "methods", "quick", "threads", "jobs",
                                          "dense_epochs", "ft_epochs", "rounds", "easier_steps", "max_drop",
                                          "val_fraction", "batch_size", "limit", "no_inexact", "fold_epochs",
                                          "target_speedup", "no_224", "report_only", "note")}
    os.makedirs(args.cache, exist_ok=True)
    # ResNet tasks are the heavier ones (easier runs up to 17 steps): alternate the models so two
    # workers stay busy until the end.
    order = sorted(args.models, key=lambda m: m != "resnet")
    tasks = [{"model": m, "seed": s, "threads": args.threads, "cfg": cfg, "cache": args.cache}
             for s in args.seeds for m in order]
    start = time.perf_counter()
    load_start = list(os.getloadavg())
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results = []
    if args.report_only:
        results = [_from_cache(t) for t in tasks]
    elif args.jobs == 1:
        for t in tasks:
            results.append(run_task(t))
            print(f"fidelity: {t['model']} seed {t['seed']} done ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as ex:
            futures = [(t, ex.submit(run_task, t)) for t in tasks]
            for t, f in futures:
                results.append(f.result())
                print(f"fidelity: {t['model']} seed {t['seed']} done ({time.perf_counter() - start:.0f} s)",
                      flush=True)
    rows = [r for res in results for r in res["rows"]]
    errors = [e for res in results for e in res["errors"]]
    splits = next((res["splits"] for res in results if res.get("splits")), {})
    linear = _linear_cached(args, cfg)
    report = {"date": date, "argv": raw_argv, "config": cfg, "machine": machine(), "load_start": load_start,
              "load_end": list(os.getloadavg()), "wall_s": time.perf_counter() - start, "splits": splits,
              "linear": linear, "rows": rows, "errors": errors}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1, default=str)
    md = markdown(report)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    plotted = plot(report, args.out + ".png")
    print(md)
    print(f"fidelity: wrote {args.out}.json, {args.out}.md" + (f", {args.out}.png" if plotted else ""))
    for e in errors:
        print(f"fidelity: ERROR {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
