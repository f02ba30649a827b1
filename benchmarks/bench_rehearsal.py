"""ImageNet-scale rehearsal: a 2-process ``egp-fast prune`` run of ResNet-50 on 224 px JPEGs (issue 21, item 5).

    .venv/bin/python benchmarks/bench_rehearsal.py --root /tmp/egp_rehearsal \\
        --out benchmarks/results/rehearsal

1. Makes an ImageNet-layout folder (``ROOT/train/<class>/*.JPEG``, ``ROOT/val/<class>/*.JPEG``,
   what ``--data imagenet:ROOT`` reads) of deterministic generated images at 224 x 224: each
   class has its own stripe orientation, stripe frequency and tint; each image its own phase,
   offset, brightness and noise (seeded by class and index), saved as JPEG (quality 90). A folder
   made earlier with the same settings is reused (``ROOT/rehearsal.json`` records them).
2. Runs, on the CPU with gloo and one thread per process::

       torchrun --standalone --nproc_per_node=2 -m egp_fast.cli prune --model resnet50 \\
           --data imagenet:ROOT --measure auto --device cpu --threads 1 --dense-epochs 0 \\
           --epochs 1 --rounds 1 --batch-size 8 --eval-batch-size 16 --no-progress --out RUN

   (``OMP_NUM_THREADS=1``; the sizes are options, see ``--help``). Random init, no dense
   training: the rehearsal is about where the time goes, not accuracy.
3. Reads the run's ``report.json``: every round's time split (setup, training, evaluation,
   measurement, selection, masks, other) and the end's (collapse, latency, saving), each the
   rank 0's (:mod:`egp_fast.cli.timing`), and EGP's own share of a round: (measurement +
   selection + masks) / one fine-tune epoch.
4. Extrapolates to ImageNet-1k (``--target-images``, 1.28 M) on ``--target-gpus`` GPUs: the
   measurement of ``--measure auto`` stops once every site and the plan are decided, after a
   number of samples that depends on the model and the evidence, not on the size of the
   training set; selection and masks depend on the weights only; the epoch grows with the
   images. So the share is ``(samples measured x forward time per sample + selection and masks)
   / (images x training time per image)``, with the per-sample times in the ratio measured here
   (the GPU throughputs assumed are options and are written next to the figure).

With ``--measure track`` the round's entropies are counted during its fine-tune epoch (no
measurement pass; round 0, with no dense epoch to track, still measures with a pass): EGP's
phases are then only the summing of the counts, the selection and the masks, and the counting
inside the epoch is timed apart (``--overhead-steps``: plain and tracked ResNet-50 training steps,
interleaved). ``--append`` adds the results to ``OUT.md`` as a new section.

Writes ``OUT.json`` and ``OUT.md`` (machine, load average before and after, date) and keeps the
run's log (``OUT.log``) and run directory (under ``ROOT``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time

PHASE_ORDER = ("setup", "train", "eval", "measure", "select", "masks", "collapse", "latency", "save", "other")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/egp_rehearsal", help="where the image folder and the run go")
    ap.add_argument("--classes", type=int, default=10, help="classes (default 10)")
    ap.add_argument("--train-per-class", type=int, default=200, help="training images per class (default 200)")
    ap.add_argument("--val-per-class", type=int, default=20, help="validation (test) images per class (default 20)")
    ap.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the images (default 0)")
    ap.add_argument("--nproc", type=int, default=2, help="processes (torchrun --nproc_per_node; default 2)")
    ap.add_argument("--batch-size", type=int, default=8, help="global training batch (default 8)")
    ap.add_argument("--eval-batch-size", type=int, default=16, help="evaluation/measurement batch per rank "
                    "(default 16)")
    ap.add_argument("--epochs", type=int, default=1, help="fine-tune epochs of the round (default 1)")
    ap.add_argument("--measure", choices=("auto", "full", "track"), default="auto", help="egp-fast's --measure "
                    "(default auto); track counts the entropies during the fine-tune epoch (no measurement pass)")
    ap.add_argument("--overhead-steps", type=int, default=6, help="with --measure track: after the run, time this "
                    "many ResNet-50 training steps with and without the tracker, interleaved, for the counting's "
                    "share of a training step (default 6; 0 skips)")
    ap.add_argument("--append", action="store_true", help="append the markdown to OUT.md as a new section "
                    "and write OUT.<measure>.json / .log instead of replacing OUT.json / OUT.md")
    ap.add_argument("--extra", default="", help="more egp-fast prune options, one string")
    ap.add_argument("--timeout-s", type=float, default=3600, help="give up on the run after this (default 3600)")
    ap.add_argument("--target-images", type=int, default=1_281_167, help="ImageNet-1k training images")
    ap.add_argument("--target-gpus", type=int, default=8, help="GPUs of the extrapolation (default 8)")
    ap.add_argument("--gpu-train-ips", type=float, default=1200.0, help="assumed ResNet-50 training images/s "
                    "per GPU (default 1200: an A100 with mixed precision)")
    ap.add_argument("--out", default=None, help="write OUT.json, OUT.md and OUT.log")
    ap.add_argument("--report", default=None, help="only summarise this existing report.json (no run)")
    return ap.parse_args(argv)


def _image(cls: int, idx: int, classes: int, size: int, seed: int):
    """One deterministic RGB image (uint8 [size, size, 3]) of class ``cls``."""
    import numpy as np

    rng = np.random.default_rng([seed, cls, idx])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = np.pi * cls / classes + rng.normal(0, 0.05)
    freq = 4 + 3 * (cls % 4) + rng.normal(0, 0.3)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
    tint = np.array([(cls * 37) % 255, (cls * 91 + 60) % 255, (cls * 53 + 120) % 255], np.float32) / 255
    img = 0.5 + 0.25 * stripes[..., None] * (0.5 + tint) + rng.uniform(-0.1, 0.1)
    img = img + rng.normal(0, 0.06, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_folder(args: argparse.Namespace) -> dict:
    """Create (or reuse) the ImageNet-layout folder; returns what it holds and how long it took."""
    from PIL import Image

    data = os.path.join(args.root, "data")
    want = {"classes": args.classes, "train_per_class": args.train_per_class, "val_per_class": args.val_per_class,
            "size": args.size, "seed": args.seed}
    marker = os.path.join(data, "rehearsal.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            have = json.load(f)
        if {k: have.get(k) for k in want} == want:
            return {**have, "reused": True}
    t0 = time.perf_counter()
    nbytes = 0
    for split, n in (("train", args.train_per_class), ("val", args.val_per_class)):
        for c in range(args.classes):
            d = os.path.join(data, split, f"n{c:08d}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                idx = i if split == "train" else 1_000_000 + i
                p = os.path.join(d, f"{split}_{c:03d}_{i:05d}.JPEG")
                Image.fromarray(_image(c, idx, args.classes, args.size, args.seed)).save(p, quality=90)
                nbytes += os.path.getsize(p)
    info = {**want, "path": data, "bytes": nbytes, "seconds": time.perf_counter() - t0,
            "train_images": args.classes * args.train_per_class, "val_images": args.classes * args.val_per_class}
    with open(marker, "w") as f:
        json.dump(info, f, indent=1)
    return {**info, "reused": False}


def prune_command(args: argparse.Namespace, data: str, run_dir: str) -> list[str]:
    """The torchrun command line of the rehearsal."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "egp_fast.cli", "prune", "--model", "resnet50", "--data", f"imagenet:{data}",
           "--measure", args.measure, "--device", "cpu", "--threads", "1", "--dense-epochs", "0",
           "--epochs", str(args.epochs), "--rounds", "1", "--batch-size", str(args.batch_size),
           "--eval-batch-size", str(args.eval_batch_size), "--no-progress", "--out", run_dir]
    return cmd + args.extra.split()


def _out_base(args: argparse.Namespace) -> str:
    """OUT, or OUT.<measure> with --append (the section's own JSON and log beside OUT.md)."""
    return f"{args.out}.{args.measure}" if args.append else args.out


def _loadavg() -> list[float]:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return []


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def tracking_overhead(steps: int, batch: int, size: int, classes: int) -> dict:
    """The counting's share of a ResNet-50 training step: plain and tracked steps, interleaved.

    One thread, random init, masks attached (as in the run), SGD; the tracked step opens
    ``Pruner.track()`` around its own forward and backward (entering and leaving the tracker is
    included: an upper bound on what one tracked epoch pays per step).

    Args:
        steps: timed steps of each kind (after one untimed step of each).
        batch: images per step (the run's per-rank batch).
        size: image side.
        classes: output classes.

    Returns:
        ``plain_s`` and ``tracked_s`` (median seconds per step), ``ratio`` (the median of the
        per-pair tracked / plain ratios), ``pairs`` and the per-pair ratios.
    """
    import statistics

    import torch
    import torchvision

    from egp_fast import Pruner

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=classes)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, classes, (batch,))
    pruner = Pruner(model, x[:2], progress=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    def timed(tracked: bool) -> float:
        t0 = time.perf_counter()
        if tracked:
            with pruner.track():
                step()
        else:
            step()
        return time.perf_counter() - t0

    timed(False), timed(True)
    plain, tracked = [], []
    for _ in range(steps):
        plain.append(timed(False))
        tracked.append(timed(True))
    ratios = [b / a for a, b in zip(plain, tracked)]
    return {"plain_s": statistics.median(plain), "tracked_s": statistics.median(tracked),
            "ratio": statistics.median(ratios), "pairs": steps, "ratios": ratios, "batch": batch,
            "load": _loadavg()}


def analyse(report: dict, args: argparse.Namespace) -> dict:
    """The time split, EGP's share of an epoch and the ImageNet-1k extrapolation from a report.

    Args:
        report: the run's report.json.
        args: the options (extrapolation assumptions).

    Returns:
        A JSON-safe dict.
    """
    s = report["summary"]
    cfg = report["config"]
    ranks = s.get("world_size", 1)
    data = report["data"]
    pruned = [r for r in report["rounds"] if r["round"] >= 1]
    r1 = pruned[0]
    t = r1["time"]
    egp = t["measure"] + t["select"] + t["masks"]
    epoch = t["train"] / cfg["epochs"]
    # samples the measurement of round 1 used (all ranks: its batches and samples are summed over them)
    meas_batches = r1.get("measure_batches")
    meas_samples = (r1.get("stats") or {}).get("samples")
    if meas_samples is None and meas_batches is not None:
        meas_samples = min(meas_batches * cfg["eval_batch_size"], data["train_size"])
    stopped = bool(r1.get("measure_stopped_early"))
    tracked = r1.get("measure_source") == "track"
    out = {"measure_mode": cfg.get("measure"), "measure_source": r1.get("measure_source", "pass"),
        "world_size": ranks, "train_images": data["train_size"], "val_images": data["val_size"],
        "test_images": data["test_size"], "train_batches_per_epoch": -(-data["train_size"] // cfg["batch_size"]),
        "rounds": [{"round": r["round"], "seconds": r["seconds"], "time": r["time"],
                    "measure_batches": r.get("measure_batches"), "measure_stopped_early": r.get("measure_stopped_early"),
                    "measure_source": r.get("measure_source", "pass"), "measure_note": r.get("measure_note")}
                   for r in report["rounds"]],
        "final": s.get("time_final"), "total": s.get("time"), "wall_seconds": s.get("wall_seconds"),
        "egp_seconds": egp, "finetune_epoch_seconds": epoch, "egp_share_of_epoch": egp / epoch if epoch else None,
        "measure_share_of_epoch": t["measure"] / epoch if epoch else None,
        "select_masks_seconds": t["select"] + t["masks"], "measure_seconds": t["measure"],
        "measure_samples": meas_samples, "measure_stopped_early": stopped, "params": report["model"]["params"],
    }
    if tracked and epoch:
        # --measure track: no pass. What a round adds is the counting inside the tracked epoch (the
        # overhead ratio of a training step, measured side by side) plus the summing of the counts
        # over the ranks, the selection and the masks (seconds; on the CPU with gloo here, an upper
        # bound for GPUs with NCCL).
        ov = getattr(args, "overhead", None)
        frac = (ov["ratio"] - 1.0) if ov else None
        gpu_epoch = args.target_images / (args.target_gpus * args.gpu_train_ips)
        fixed = t["measure"] + t["select"] + t["masks"]
        out["counting_overhead"] = ov
        out["egp_share_with_counting"] = None if frac is None else max(frac, 0.0) + egp / epoch
        out["extrapolation"] = {
            "target_images": args.target_images, "target_gpus": args.target_gpus,
            "gpu_train_images_per_s": args.gpu_train_ips, "epoch_seconds": gpu_epoch,
            "fixed_seconds_upper": fixed, "counting_fraction": frac,
            "egp_share_of_epoch": None if frac is None else max(frac, 0.0) + fixed / gpu_epoch,
            "here_share_at_target": fixed / (epoch * args.target_images / data["train_size"]),
        }
    elif meas_samples and epoch:
        # per-sample costs here, relative to each other (the same model and machine)
        train_per_img = t["train"] * ranks / (cfg["epochs"] * data["train_size"])  # rank-seconds per image
        fwd_per_img = t["measure"] * ranks / meas_samples
        ratio = fwd_per_img / train_per_img
        gpu_epoch = args.target_images / (args.target_gpus * args.gpu_train_ips)
        gpu_meas = meas_samples * ratio / (args.target_gpus * args.gpu_train_ips)
        # selection and masks: CPU seconds measured here for these weights; counted as they are
        # (an upper bound: on a GPU they run at >= 1 G weights/s)
        gpu_sel = t["select"] + t["masks"]
        full_pass = args.target_images * ratio / (args.target_gpus * args.gpu_train_ips)
        # the samples --measure auto may use for EGP's share to stay at 5% of the target epoch
        budget = 0.05 * gpu_epoch - gpu_sel
        out["extrapolation"] = {
            "target_images": args.target_images, "target_gpus": args.target_gpus,
            "gpu_train_images_per_s": args.gpu_train_ips,
            "forward_vs_train_per_image": ratio,
            "epoch_seconds": gpu_epoch, "select_masks_seconds_upper": gpu_sel,
            # when the measurement stopped early here, the same samples suffice there; when it did
            # not, these are lower bounds (it needs more than the whole split here)
            "measure_seconds": gpu_meas, "egp_share_of_epoch": (gpu_meas + gpu_sel) / gpu_epoch,
            "is_lower_bound": not stopped,
            "samples_for_5pct": max(0.0, budget) * args.target_gpus * args.gpu_train_ips / ratio,
            "full_pass_measure_seconds": full_pass, "full_pass_share_of_epoch": (full_pass + gpu_sel) / gpu_epoch,
            # the same rehearsal machine, 1.28 M images: the epoch grows, the measurement does not
            "here_share_at_target": (t["measure"] + t["select"] + t["masks"])
            / (epoch * args.target_images / data["train_size"]),
        }
    return out


def _row(name: str, t: dict | None) -> str:
    t = t or {}
    total = sum(t.values())
    cells = " | ".join(f"{t.get(p, 0.0):.1f}" if t.get(p, 0.0) >= 0.95 or not t.get(p) else f"{t[p]:.2f}"
                       for p in PHASE_ORDER)
    return f"| {name} | {cells} | {total:.1f} |"


def markdown(res: dict) -> str:
    """The results as markdown (benchmarks/results/rehearsal.md)."""
    a, an = res["args"], res["analysis"]
    tracked = an.get("measure_source") == "track"
    lines = [
        ("## `--measure track`: the entropies counted during the fine-tune epoch (no measurement pass)" if tracked
         else "# ImageNet-scale rehearsal: ResNet-50, 224 px JPEGs, 2 processes on the CPU"),
        "",
        f"`{res['command']}` — {res['date']}, {res['machine']}, load average before {res['load_before']}, "
        f"after {res['load_after']}; torch {res['torch']}.",
        "",
        f"Data: {a['classes']} classes x {a['train_per_class']} training + {a['val_per_class']} validation JPEGs "
        f"at {a['size']} px, generated (made in {res['folder'].get('seconds', 0):.0f} s"
        + (", reused" if res["folder"].get("reused") else "") + f"). The run holds out 10% of the training "
        f"images: {an['train_images']} train, {an['val_images']} val (held out), {an['test_images']} test.",
        f"Run: `{' '.join(res['prune_command'])}` with OMP_NUM_THREADS=1: {an['world_size']} ranks (gloo), "
        f"1 thread each, global batch {a['batch_size']} ({an['train_batches_per_epoch']} batches per epoch), "
        f"evaluation/measurement batch {a['eval_batch_size']} per rank, random init (ResNet-50, "
        f"{an['params'] / 1e6:.1f} M parameters), no dense training, 1 round of {a['epochs']} fine-tune epoch(s). "
        f"Run wall time {res['run_seconds']:.0f} s.",
        "",
        "Seconds per phase (as report.json gives them):",
        "",
        "| | " + " | ".join(PHASE_ORDER) + " | total |",
        "|---" * (len(PHASE_ORDER) + 2) + "|",
    ]
    for r in an["rounds"]:
        lines.append(_row(f"round {r['round']}" + (" (dense)" if r["round"] == 0 else ""), r["time"]))
    lines.append(_row("end (collapse...)", an["final"]))
    lines.append(_row("**run**", an["total"]))
    share = an["egp_share_of_epoch"]
    summed, wall = sum((an["total"] or {}).values()), an.get("wall_seconds") or 0.0
    if wall and summed > 1.01 * wall:
        lines += ["", f"The phases add up to {summed:.0f} s, more than the run's wall time ({wall:.0f} s): this run "
                  "was recorded while the report took each phase's maximum over the ranks, so at the end rank 1's "
                  "evaluation of the collapsed model (which includes its wait for rank 0's latency measurement) and "
                  "rank 0's latency measurement were both counted. The rounds are not affected (every rank runs "
                  "the same phases). The report now gives rank 0's split, which adds up to the wall time."]
    if tracked:
        return "\n".join(lines + [""] + _track_text(res)) + "\n"
    lines += [
        "",
        f"Round 1: EGP's own work (measurement {an['measure_seconds']:.1f} s + selection and masks "
        f"{an['select_masks_seconds']:.2f} s) = {an['egp_seconds']:.1f} s = **{100 * share:.1f}% of one fine-tune "
        f"epoch** ({an['finetune_epoch_seconds']:.0f} s); the measurement alone {100 * an['measure_share_of_epoch']:.1f}%. "
        f"`--measure auto` used {an['rounds'][1]['measure_batches']} batches ({an['measure_samples']} samples over the "
        f"ranks; stopped early: {an['rounds'][1]['measure_stopped_early']}).",
    ]
    ex = an.get("extrapolation")
    if ex:
        head = (f"ImageNet-1k extrapolation ({ex['target_images']:,} training images, {ex['target_gpus']} GPUs at an "
                f"assumed {ex['gpu_train_images_per_s']:.0f} training images/s each): one epoch "
                f"{ex['epoch_seconds']:.0f} s. A forward pass costs {ex['forward_vs_train_per_image']:.2f}x a "
                f"training step per image (measured here); selection and masks depend on the weights only and "
                f"cost at most the {ex['select_masks_seconds_upper']:.2f} s measured here on the CPU. ")
        if not ex["is_lower_bound"]:
            body = (f"The measurement stops after about the same {an['measure_samples']} samples there (the evidence "
                    f"it needs does not grow with the training set): {ex['measure_seconds']:.2f} s. "
                    f"**EGP's share: {100 * ex['egp_share_of_epoch']:.2f}% of an epoch.** On this machine with "
                    f"1.28 M images it would be {100 * ex['here_share_at_target']:.3f}%.")
        else:
            body = (f"Here `--measure auto` did not stop before the end of the training split, so the samples it "
                    f"needs are unknown (more than {an['measure_samples']}): EGP's share there is at least "
                    f"{100 * ex['egp_share_of_epoch']:.2f}% and at most {100 * ex['full_pass_share_of_epoch']:.0f}% "
                    f"(a whole pass over the 1.28 M images, as with `--measure full`). It stays within 5% of an "
                    f"epoch if the measurement stops within **{ex['samples_for_5pct']:,.0f} samples** "
                    f"({100 * ex['samples_for_5pct'] / ex['target_images']:.0f}% of the training set); "
                    "`--measure-batches` caps it.")
        lines += ["", head + body]
    return "\n".join(lines) + "\n"


def _track_text(res: dict) -> list[str]:
    """The paragraphs of a ``--measure track`` run: where the round's statistics came from, EGP's
    share of an epoch with and without the counting inside it, the ImageNet-1k extrapolation."""
    an = res["analysis"]
    r0, r1 = an["rounds"][0], an["rounds"][1]
    how = {"pass": "a measurement pass", "track": "counting during training"}
    out = [f"Round 0's statistics came from {how.get(r0['measure_source'], r0['measure_source'])}"
           + (f" ({r0['measure_note']})" if r0.get("measure_note") else "")
           + f": {r0['measure_batches']} batches"
           + (f", stopped early: {r0['measure_stopped_early']}" if r0["measure_source"] == "pass" else "") + ". "
           f"Round 1's statistics came from {how.get(r1['measure_source'], r1['measure_source'])}"
           + (" (its fine-tune epoch)" if r1["measure_source"] == "track" else f" ({r1.get('measure_note')})")
           + f": {r1['measure_batches']} training batches over the ranks; the collapse at the end used the "
           "latest statistics."]
    share = an["egp_share_of_epoch"]
    text = (f"Round 1: EGP's own phases (summing the counts over the ranks {an['measure_seconds']:.2f} s + "
            f"selection and masks {an['select_masks_seconds']:.2f} s) = {an['egp_seconds']:.2f} s = "
            f"**{100 * share:.2f}% of one fine-tune epoch** ({an['finetune_epoch_seconds']:.0f} s, which includes "
            "the counting).")
    ov = an.get("counting_overhead")
    if ov:
        text += (f" The counting itself, timed apart ({ov['pairs']} plain and {ov['pairs']} tracked training steps "
                 f"of the same ResNet-50, batch {ov['batch']}, 1 thread, interleaved; load {ov['load']}): "
                 f"{ov['ratio']:.3f}x a plain step (median of the pairs' ratios; pairs "
                 f"{min(ov['ratios']):.3f}-{max(ov['ratios']):.3f}x), so **EGP's share with the counting: "
                 f"{100 * an['egp_share_with_counting']:.1f}% of an epoch** (each tracked step enters and leaves the "
                 "tracker, so this is an upper bound).")
    out += ["", text]
    ex = an.get("extrapolation")
    if ex:
        body = (f"ImageNet-1k extrapolation ({ex['target_images']:,} training images, {ex['target_gpus']} GPUs at an "
                f"assumed {ex['gpu_train_images_per_s']:.0f} training images/s each): one epoch "
                f"{ex['epoch_seconds']:.0f} s. With `--measure track` a round pays the counting inside its last "
                f"epoch (the same fraction of a training step is assumed there as measured here) plus the summing, "
                f"selection and masks, which depend on the weights only (at most the {ex['fixed_seconds_upper']:.2f} s "
                "measured here on the CPU)")
        if ex["egp_share_of_epoch"] is not None:
            body += f": **{100 * ex['egp_share_of_epoch']:.1f}% of an epoch**."
        else:
            body += "."
        body += (f" On this machine with 1.28 M images, the phases outside training would be "
                 f"{100 * ex['here_share_at_target']:.4f}% of an epoch.")
        out += ["", body]
    return out


def main(argv: list[str] | None = None) -> int:
    """Make the folder, run the rehearsal, write the results."""
    args = parse_args(argv)
    import torch

    os.makedirs(args.root, exist_ok=True)
    folder: dict = {}
    run_dir = os.path.join(args.root, "run")
    cmd: list[str] = []
    load_before = _loadavg()
    run_s = 0.0
    if args.report:
        with open(args.report) as f:
            report = json.load(f)
        run_dir = os.path.dirname(os.path.abspath(args.report))
        try:  # the run's own command line (config.json), for the results text
            with open(os.path.join(run_dir, "config.json")) as f:
                cmd = ["python", "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={report['summary'].get('world_size', 1)}", "-m", "egp_fast.cli",
                       *json.load(f)["command"][1:]]
        except (OSError, KeyError, ValueError):
            cmd = []
        run_s = float(report.get("summary", {}).get("wall_seconds") or 0.0)
    else:
        folder = make_folder(args)
        print(f"image folder: {folder['path']} ({'reused' if folder['reused'] else 'made'})", flush=True)
        run_dir = os.path.join(args.root, "run-" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
        cmd = prune_command(args, folder["path"], run_dir)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        log = (_out_base(args) + ".log") if args.out else os.path.join(args.root, "rehearsal.log")
        print(" ".join(cmd), flush=True)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=args.timeout_s,
                                  check=False)
        run_s = time.perf_counter() - t0
        if proc.returncode != 0:
            print(f"the run failed ({proc.returncode}); see {log}", file=sys.stderr)
            return proc.returncode
        with open(os.path.join(run_dir, "report.json")) as f:
            report = json.load(f)
    args.overhead = None
    if report["config"].get("measure") == "track" and args.overhead_steps > 0:
        print(f"timing the counting: {args.overhead_steps} plain and tracked training steps, interleaved", flush=True)
        args.overhead = tracking_overhead(args.overhead_steps, args.batch_size // args.nproc, args.size, args.classes)
    res = {
        "command": "python benchmarks/bench_rehearsal.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{_cpu_name()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
        "load_before": load_before, "load_after": _loadavg(), "args": vars(args), "folder": folder,
        "prune_command": [os.path.basename(c) if i == 0 else c for i, c in enumerate(cmd)] or ["(from --report)"],
        "run_dir": run_dir, "run_seconds": run_s, "analysis": analyse(report, args),
    }
    text = markdown(res)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(_out_base(args) + ".json", "w") as f:
            json.dump(res, f, indent=1)
        with open(args.out + ".md", "a" if args.append else "w") as f:
            f.write(("\n" if args.append else "") + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
