"""The ``egp-fast`` command: train, prune in rounds with fine-tuning, collapse, report.

Subcommands:

* ``egp-fast prune [options]`` — one run directory per run (``--out DIR``, default
  ``runs/<method>-<data>-<timestamp>``). With no options it is the demo: a CIFAR-style
  ResNet-18 of width 16 trained on scikit-learn's digits (16x16), 4 EGP rounds of 50 % with
  8 fine-tune epochs each, then collapse. ``--method imp`` runs the IMP baseline the same way.
  ``--method easier`` removes the lowest-entropy activation site per step (2 fine-tune epochs
  each), stops at ``--max-drop`` below the dense validation accuracy and keeps the best step;
  ``--model digits_vit`` trains a small ViT instead. ``--fold-epochs N`` fine-tunes the
  collapsed model itself afterwards.
* ``egp-fast demo [options]`` — the same command under a memorable name.
* ``egp-fast report RUN_DIR [RUN_DIR ...]`` — re-render tables and plots; several runs are
  compared side by side (EGP vs IMP).

Distributed: ``torchrun --nproc_per_node=N -m egp_fast.cli prune ...`` (NCCL on GPU, gloo on the
CPU). ``--batch-size`` is the global batch, split over the ranks; entropy counts are summed
over ranks; every rank applies identical masks (checked); only rank 0 writes files.

Data: ``--val-fraction`` (default 0.1) of the training split is held out, stratified by class
and seeded by ``--seed``; EASIER's tolerance and collapse's held-out flip check
(``--max-flip``/``--confidence``) use it, the test split only reports. ``--measure auto`` stops
each entropy measurement once every site is decided; ``--measure track`` skips the measurement
pass and counts the signs during each round's last training epoch instead. DataLoader workers default to at most the
cores available to each process.

Checkpoints (``checkpoint.pt``) are written atomically after every epoch and every round;
``--resume RUN_DIR`` continues exactly where the run stopped.

Output: progress bars only on a terminal; redirected (``egp-fast demo > log.txt``) the run
prints one plain line per epoch and per round, so the log reads like a table of the run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from egp_fast.cli import defaults
from egp_fast.cli.distributed import cleanup_distributed, init_distributed
from egp_fast.cli.run import Run
from egp_fast.cli.rundir import agree_on_run_dir, is_nonempty_dir, missing_ancestors
from egp_fast.errors import CheckpointError, ConfigError, EGPError

# Shared with egp_fast.cli.run (through egp_fast.cli.defaults); re-exported here because callers
# have imported them from the command's module.
DEFAULTS = defaults.DEFAULTS
RUNTIME_OPTIONS = defaults.RUNTIME_OPTIONS
PROG = defaults.PROG


class _UsageError(Exception):
    """A command-line error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit; we want one line
        raise _UsageError(message)


def _milestones(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one milestone")
    return values


def _add_run_options(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS  # defaults are filled in later, so we know which options were given
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=S, help="cifar_resnet18 (3x3 stem, for small images), a torchvision "
                   "name (resnet50, swin_t, ...) or timm:<name> (default: cifar_resnet18)")
    g.add_argument("--width", type=int, default=S, help="cifar_resnet18 first-stage width (default: 16 on "
                   "digits, 64 otherwise)")
    g.add_argument("--weights", default=S, metavar="PATH", help="load this local state_dict before training "
                   "(weights_only=True)")
    g.add_argument("--data", default=S, help="digits (embedded), digits-hard (embedded: digits rotated, "
                   "scaled and moved on a 32x32 canvas with clutter and noise, where a linear classifier "
                   "is at chance), cifar10:PATH, imagefolder:PATH or imagenet:PATH (default: digits)")
    g.add_argument("--image-size", type=int, default=S, help="image side (default: 16 digits, 32 digits-hard and "
                   "cifar10, 224 folders)")
    g.add_argument("--limit", type=int, default=S, help="use at most N samples of each split (quick runs)")
    g.add_argument("--val-fraction", type=float, default=S, help="fraction of the TRAINING data held out "
                   "(stratified, by --seed) as the validation split: EASIER's accuracy tolerance and "
                   "collapse's held-out flip check use it; the test split only reports (default 0.1; "
                   "0 disables both)")
    g = p.add_argument_group("pruning")
    g.add_argument("--method", choices=defaults.METHODS, default=S, help="egp (default), the imp baseline, or "
                   "easier (remove the lowest-entropy activation each step, keep the best model within "
                   "--max-drop)")
    g.add_argument("--rounds", type=int, default=S, help="pruning rounds; for easier the most removal steps "
                   "(default 4; easier: 17)")
    g.add_argument("--max-drop", type=float, default=S, help="easier: largest validation accuracy drop vs "
                   "the dense model that a kept step may have, as a fraction (default 0.01 = 1 pt)")
    g.add_argument("--linearization", choices=("identity", "majority"), default=S, help="easier: a removed "
                   "site becomes the identity (EASIER) or, per channel, identity/zero by its majority "
                   "state (default identity)")
    g.add_argument("--objective", choices=("sites", "latency"), default=S, help="easier: what each step "
                   "removes: sites (the lowest-entropy site, EASIER's rule; default) or latency (the group "
                   "of sites whose removal lets collapse merge layers, with the least entropy per FLOP saved; "
                   "each step reports the predicted and measured speed-up)")
    g.add_argument("--target-speedup", type=float, default=S, help="easier with --objective latency: stop "
                   "once the predicted speed-up of the collapsed model reaches this (> 1.0; default: no such "
                   "stop)")
    g.add_argument("--step", type=float, default=S, help="zeta: fraction of the remaining eligible weights "
                   "pruned per round, in (0, 1) (default 0.5)")
    g.add_argument("--measure-batches", type=int, default=S, help="cap on entropy measurement batches "
                   "(default: the whole training split)")
    g.add_argument("--entropy-mode", choices=("exact", "paper"), default=S, help="exact counts (default) "
                   "or the reference scripts' per-batch average")
    g.add_argument("--measure", choices=defaults.MEASURE_MODES, default=S, help="full: measure entropy "
                   "with an eval-mode pass over the whole training split (default); auto: the same pass, stopped "
                   "once every site is decided (stop='decided'); track: no extra pass, count activation signs "
                   "during the last fine-tune epoch of each round (and the last dense epoch). Tracked entropies "
                   "describe the model while it trains: BatchNorm normalises with each rank's batch statistics, "
                   "dropout is on and the weights move during the epoch, so they can differ from an eval-mode "
                   "pass. Where no epoch "
                   "was tracked (--dense-epochs 0, a resumed run, EASIER's return to its best step) the run "
                   "measures with an 'auto' pass and says so; with --compile the tracked epoch runs uncompiled")
    g.add_argument("--max-flip", type=float, default=S, help="collapse (and --measure auto) only trusts a "
                   "zero-entropy site whose flip-probability bound is <= this (default 0.01)")
    g.add_argument("--confidence", type=float, default=S, help="confidence of the flip bound (default 0.95)")
    g.add_argument("--no-collapse", dest="collapse", action="store_false", default=S,
                   help="skip collapsing zero-entropy sites at the end")
    g.add_argument("--approx-collapse", action="store_true", default=S, help="allow approximate collapse "
                   "(GELU/SiLU sites, padded conv compositions)")
    g.add_argument("--fold-epochs", type=int, default=S, help="after collapse, fine-tune the collapsed model "
                   "itself this many epochs and report accuracy before and after (default 0)")
    g.add_argument("--fold-lr", type=float, default=S, help="learning rate of --fold-epochs (default: --lr / 10; "
                   "the folded model has no BatchNorm left)")
    g = p.add_argument_group("training")
    g.add_argument("--dense-epochs", type=int, default=S, help="dense training epochs before pruning "
                   "(default 15; 0 with --weights)")
    g.add_argument("--epochs", type=int, default=S, help="fine-tune epochs per round (default 8; easier: 2 "
                   "per removal step)")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default=S, help="default sgd (momentum 0.9); "
                   "adamw for digits_vit (torch's fused AdamW when the model is on one CPU/CUDA device)")
    g.add_argument("--dense-lr", type=float, default=S, help="learning rate of dense training (default 0.1; "
                   "digits_vit 1e-3)")
    g.add_argument("--lr", type=float, default=S, help="learning rate of each fine-tune round (default 0.01; "
                   "digits_vit 5e-4)")
    g.add_argument("--momentum", type=float, default=S, help="SGD momentum (default 0.9)")
    g.add_argument("--weight-decay", type=float, default=S, help="default 1e-4 (EGP reference)")
    g.add_argument("--schedule", choices=("cosine", "multistep", "constant"), default=S,
                   help="per-phase schedule: cosine (default) or multistep as in EGP's reference (x gamma "
                   "at the milestones)")
    g.add_argument("--milestones", type=_milestones, default=S, help="multistep milestones, fractions of "
                   "the phase's epochs or epoch numbers (default 0.5,0.75)")
    g.add_argument("--gamma", type=float, default=S, help="multistep decay (default 0.1)")
    g.add_argument("--batch-size", type=int, default=S, help="global training batch, split over ranks "
                   "(default 64)")
    g.add_argument("--eval-batch-size", type=int, default=S, help="evaluation/measurement batch per rank "
                   "(default 256)")
    g.add_argument("--amp", action="store_true", default=S, help="mixed precision (fp16 on CUDA, bf16 on CPU)")
    g.add_argument("--channels-last", action="store_true", default=S, help="channels-last memory format")
    g.add_argument("--compile", action="store_true", default=S, help="torch.compile the model for training "
                   "and evaluation (masks stay enforced; pays off on long runs, slow to start on a CPU)")
    g.add_argument("--seed", type=int, default=S, help="seed of initialisation and shuffling (default 0)")
    g.add_argument("--workers", type=int, default=S, help="DataLoader workers for on-disk data (default: "
                   "4, at most the cores available to each process)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default=S, help="default auto")
    g.add_argument("--threads", type=int, default=S, help="CPU threads (default: 1 for digits, whose tiny "
                   "convolutions run faster single-threaded, especially on a shared machine; torch's "
                   "default otherwise)")
    g = p.add_argument_group("run directory")
    g.add_argument("--out", default=S, metavar="DIR", help="run directory (default runs/<method>-<data>-<time>)")
    g.add_argument("--name", default=S, help="run directory name under --runs-root")
    g.add_argument("--runs-root", default=S, metavar="DIR", help="parent of default run directories "
                   "(default runs)")
    g.add_argument("--resume", default=S, metavar="RUN_DIR", help="continue this run where it stopped")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S,
                   help="no progress bars, one plain line per epoch and per round instead (bars are drawn "
                   "only on a terminal; output to a file or a pipe always gets the plain lines)")
    g.add_argument("--no-latency", dest="latency", action="store_false", default=S,
                   help="skip the latency measurements of the summary (a few seconds)")


def build_parser() -> argparse.ArgumentParser:
    """The ``egp-fast`` argument parser (errors raise instead of exiting).

    Returns:
        The parser with subcommands ``prune``, ``demo`` and ``report``.

    Example:
        >>> ns = build_parser().parse_args(["prune", "--step", "0.25"])
        >>> ns.step
        0.25
    """
    from egp_fast._version import __version__

    parser = _Parser(prog=PROG, description="Entropy Guided Pruning: prune until layers become affine, "
                     "then fold them away.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for name, text in (("prune", "train (or load), prune in rounds with fine-tuning, collapse"),
                       ("demo", "the prune command's default run: a small ResNet on digits, on the CPU")):
        sp = sub.add_parser(name, help=text, description=text)
        _add_run_options(sp)
    rp = sub.add_parser("report", help="re-render tables and plots of runs and compare them",
                        description="re-render tables and plots of runs and compare them side by side")
    rp.add_argument("runs", nargs="+", metavar="RUN_DIR")
    rp.add_argument("--out", default=None, metavar="DIR", help="where the comparison plot goes (several "
                    "runs; default: <parent of the first run>/compare-<time>)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``egp-fast`` console script.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        Exit status: 0 on success, 2 for a usage or option error, 1 for other errors (each
        printed as one line ``egp-fast: error: ...``), 130 when interrupted.

    Example:
        >>> main(["report", "runs/egp-digits"])  # doctest: +SKIP
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        ns = build_parser().parse_args(argv)
        if ns.command is None:
            raise _UsageError("choose a command: prune, demo or report (egp-fast -h for help)")
        if ns.command == "report":
            return _cmd_report(ns.runs, ns.out)
        given = {k: v for k, v in vars(ns).items() if k != "command"}
        return _cmd_prune(given)
    except _UsageError as e:
        _error(str(e))
        return 2
    except ConfigError as e:
        _error(str(e))
        return 2
    except EGPError as e:
        _error(str(e))
        return 1
    except KeyboardInterrupt:
        _error("interrupted; resume with --resume RUN_DIR")
        return 130


def _error(msg: str) -> None:
    line = " ".join(str(msg).split())  # one line, whatever the message
    print(f"{PROG}: error: {line}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# options
def _validate(cfg: dict) -> None:
    from egp_fast.cli.data import parse_data_spec
    from egp_fast.cli.models import resolve_model_name

    step = cfg["step"]
    if not (isinstance(step, (int, float)) and 0 < step < 1):
        raise ConfigError(f"--step (zeta) must be strictly between 0 and 1, got {step}; EGP uses 0.5")
    for key in ("rounds", "dense_epochs", "epochs", "workers", "fold_epochs"):
        if cfg[key] is not None and cfg[key] < 0:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 0, got {cfg[key]}")
    if not 0 <= cfg["val_fraction"] < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {cfg['val_fraction']}; e.g. 0.1")
    if cfg["method"] == "easier" and cfg["val_fraction"] == 0:
        raise ConfigError("--method easier needs a validation split held out from the training data: "
                          "--val-fraction must be > 0 (e.g. 0.1); the test split is never used to decide")
    if cfg["objective"] != "sites" and cfg["method"] != "easier":
        raise ConfigError(f"--objective {cfg['objective']} needs --method easier (it orders EASIER's removals)")
    if cfg["target_speedup"] is not None:
        if cfg["objective"] != "latency":
            raise ConfigError("--target-speedup needs --objective latency (the speed-up is predicted from the "
                              "groups of sites it removes); add --objective latency or drop --target-speedup")
        if not cfg["target_speedup"] > 1.0 or cfg["target_speedup"] == float("inf"):
            raise ConfigError(f"--target-speedup must be a finite number > 1.0, got {cfg['target_speedup']}; "
                              "1.5 stops once the collapsed model is predicted 1.5x faster")
    if cfg["measure"] not in defaults.MEASURE_MODES:
        raise ConfigError(f"--measure must be one of {', '.join(defaults.MEASURE_MODES)}, got {cfg['measure']!r}")
    if not 0 <= cfg["max_drop"] < 1:
        raise ConfigError(f"--max-drop must be a fraction in [0, 1), got {cfg['max_drop']}; 0.01 is 1 point")
    if not 0 < cfg["max_flip"] <= 1:
        raise ConfigError(f"--max-flip must be in (0, 1], got {cfg['max_flip']}; 1.0 trusts any zero entropy")
    if not 0 < cfg["confidence"] < 1:
        raise ConfigError(f"--confidence must be in (0, 1), got {cfg['confidence']}; e.g. 0.95")
    for key in ("batch_size", "eval_batch_size", "measure_batches", "limit", "width", "image_size", "threads"):
        if cfg[key] is not None and cfg[key] < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be a positive integer, got {cfg[key]}")
    for key in ("lr", "dense_lr", "fold_lr"):
        if cfg[key] is not None and not cfg[key] > 0:
            raise ConfigError(f"--{key.replace('_', '-')} must be > 0, got {cfg[key]}")
    if cfg["weight_decay"] < 0 or cfg["momentum"] < 0 or not 0 < cfg["gamma"] <= 1:
        raise ConfigError("--weight-decay and --momentum must be >= 0 and --gamma in (0, 1]")
    if any(m <= 0 for m in cfg["milestones"]):
        raise ConfigError(f"--milestones must be > 0, got {cfg['milestones']}")
    parse_data_spec(cfg["data"])
    try:
        source, _ = resolve_model_name(cfg["model"])
    except EGPError as e:
        raise ConfigError(f"--model: {e}") from None
    if source == "vit":  # its sizes must divide: say so before a run directory exists
        if cfg["width"] is not None and cfg["width"] % 4:
            raise ConfigError(f"--width {cfg['width']}: digits_vit's width must be divisible by its 4 heads "
                              "(e.g. 32 or 64)")
        if cfg["image_size"] is not None and cfg["image_size"] % 4:
            raise ConfigError(f"--image-size {cfg['image_size']}: digits_vit needs a multiple of its patch "
                              "size 4 (e.g. 16)")
    if cfg["weights"] is not None and not os.path.isfile(cfg["weights"]):
        raise ConfigError(f"--weights {cfg['weights']}: no such file")
    name = cfg["name"]
    if name is not None and (not name or name in (".", "..") or os.sep in name or "/" in name
                             or (os.altsep and os.altsep in name)):
        raise ConfigError(f"--name {name!r} must be a plain directory name (no '/', not '..'); "
                          "use --out DIR for another location")


def _resolve_derived(cfg: dict) -> dict:
    from egp_fast.cli.data import parse_data_spec
    from egp_fast.cli.models import resolve_model_name

    kind, _ = parse_data_spec(cfg["data"])
    cfg = dict(cfg)
    for key, value in defaults.METHOD_DEFAULTS[cfg["method"]].items():
        if cfg[key] is None:
            cfg[key] = value
    family = "vit" if resolve_model_name(cfg["model"])[0] == "vit" else "other"
    for key, value in defaults.MODEL_DEFAULTS[family].items():
        if cfg[key] is None:
            cfg[key] = value
    if cfg["fold_lr"] is None:
        # The collapsed model has no BatchNorm left (folded into the convs), so it takes smaller
        # steps than the masked model did.
        cfg["fold_lr"] = cfg["lr"] / 10
    if cfg["width"] is None:
        # cifar_resnet18: first-stage width; digits_vit: embedding width (64, its default).
        vit = cfg["model"] in ("digits_vit", "vit_digits")
        cfg["width"] = 16 if kind in ("digits", "digits-hard") and not vit else 64
    if cfg["image_size"] is None:
        cfg["image_size"] = {"digits": 16, "digits-hard": 32, "cifar10": 32}.get(kind, 224)
    return cfg


# ----------------------------------------------------------------------------------------------
# prune
def _cmd_prune(given: dict) -> int:
    cfg = {**DEFAULTS, **given}
    _validate(cfg)
    cfg = _resolve_derived(cfg)
    threads_before = torch.get_num_threads()
    threads = cfg["threads"]
    if threads is None and cfg["data"].lower() in ("digits", "digits-hard") and not cfg["compile"]:
        threads = 1
    info = init_distributed(cfg["device"])
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        if cfg["compile"] and info.device.type == "cpu" and torch.get_num_threads() < 2:
            # Seen here (torch 2.14, gcc 12): inductor's CPU code for a ResNet training step
            # corrupts the heap ("corrupted size vs. prev_size") when torch runs one thread.
            raise ConfigError("--compile on the CPU needs at least 2 threads (torch.compile's CPU code crashed "
                              "with 1 thread on torch 2.14); pass --threads 2 (and OMP_NUM_THREADS unset or "
                              ">= 2) or drop --compile")
        missing = missing_ancestors(cfg)
        run_dir, cfg, resuming = agree_on_run_dir(cfg, given, info)
        try:
            return Run(cfg, run_dir, resuming, info).run()
        except BaseException:
            # A new run that failed before writing anything (bad --data path, say) leaves no
            # empty directories behind.
            if info.is_main and not resuming:
                for d in [run_dir] + [m for m in missing if m != run_dir]:
                    if os.path.isdir(d) and not is_nonempty_dir(d):
                        os.rmdir(d)
            raise
    finally:
        torch.set_num_threads(threads_before)  # in-process callers (tests, notebooks) get theirs back
        cleanup_distributed(info)


# ----------------------------------------------------------------------------------------------
# report
def _cmd_report(run_dirs: list[str], out: str | None) -> int:
    from egp_fast.cli.plots import plot_sparsity_curves, render_run
    from egp_fast.cli.report import compare_table, load_run, round_table, summary_text

    runs = []
    for d in run_dirs:
        try:
            runs.append(load_run(d))
        except CheckpointError as e:
            raise ConfigError(str(e)) from None
    for run in runs:
        print(f"== {run['dir']}")
        rep = run.get("report")
        if not rep or not rep.get("rounds"):
            print("(no rounds recorded yet)")
            continue
        print(round_table(rep["rounds"]))
        if rep.get("summary"):
            print(summary_text(rep))
        for p in render_run(run):
            print(f"wrote {p}")
    if len(runs) > 1:
        print("== comparison")
        print(compare_table(runs))
        if out is None:
            parent = os.path.dirname(os.path.abspath(runs[0]["dir"]))
            out = os.path.join(parent, f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
        out = os.path.abspath(out)
        if os.path.isfile(os.path.join(out, "config.json")):
            raise ConfigError(f"--out {out} is a run directory; pick another directory for the comparison")
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create --out {out}: {e.strerror or e}") from None
        path = os.path.join(out, "compare.png")
        plot_sparsity_curves(runs, path)
        print(f"wrote {path}")
    return 0
