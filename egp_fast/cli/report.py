"""Run outputs of ``egp-fast``: metrics.csv, report.json, tables and run comparison (plots: :mod:`egp_fast.cli.plots`).

A run directory holds ``config.json`` (every option), ``metrics.csv`` (one row per epoch),
``report.json`` (one record per round, the collapse result and a summary) and PNG plots.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from egp_fast.cli.checkpoints import atomic_write_text
from egp_fast.cli.timing import time_lines, time_short
from egp_fast.errors import CheckpointError, ConfigError

__all__ = [
    "METRIC_FIELDS",
    "compare_table",
    "epoch_line",
    "load_run",
    "round_line",
    "round_table",
    "summary_text",
    "write_json",
    "write_metrics_csv",
]

#: columns of metrics.csv, one row per training epoch
METRIC_FIELDS = ("phase", "round", "epoch", "global_epoch", "lr", "train_loss", "train_acc", "test_loss",
                 "test_acc", "sparsity", "seconds")


def write_metrics_csv(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Write the per-epoch metrics atomically (the whole file each time, so a resumed run never
    duplicates rows written after its last checkpoint).

    Args:
        path: destination, usually ``RUN_DIR/metrics.csv``.
        rows: dicts with the keys of :data:`METRIC_FIELDS`.

    Example:
        >>> write_metrics_csv("/tmp/m.csv", [{"phase": "dense", "epoch": 1}])
    """
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r.get(k)) for k in METRIC_FIELDS})
    atomic_write_text(path, buf.getvalue())


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically.

    Args:
        path: destination file.
        obj: JSON-serialisable data (NaN/Inf are written as null).

    Example:
        >>> write_json("/tmp/r.json", {"a": 1})
    """
    atomic_write_text(path, json.dumps(_json_safe(obj), indent=1, allow_nan=False) + "\n")


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if hasattr(obj, "tolist"):
        return _json_safe(obj.tolist())
    return str(obj)


def load_run(run_dir: str | os.PathLike) -> dict:
    """Read a run directory's config.json and report.json.

    Args:
        run_dir: a directory written by ``egp-fast prune``.

    Returns:
        ``{"dir", "name", "config", "report"}``; ``report`` is ``None`` while the run has not
        written one yet.

    Raises:
        CheckpointError: not a run directory, or unreadable JSON.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> write_json(os.path.join(d, "config.json"), {"options": {"method": "egp"}})
        >>> run = load_run(d)
        >>> run["config"]["options"]["method"], run["report"] is None
        ('egp', True)
    """
    run_dir = os.fspath(run_dir)
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{run_dir} is not an egp-fast run directory (no config.json)")
    out = {"dir": run_dir, "name": os.path.basename(os.path.normpath(run_dir))}
    for key, fname in (("config", "config.json"), ("report", "report.json")):
        p = os.path.join(run_dir, fname)
        if not os.path.isfile(p):
            out[key] = None
            continue
        try:
            with open(p, encoding="utf-8") as f:
                out[key] = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{p} is unreadable ({e}); rerun the command that wrote it") from e
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _times(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def round_table(rounds: Sequence[dict]) -> str:
    """The per-round table: round, sparsity, accuracy, zero-entropy sites, time.

    When the records carry them, extra columns follow: ``val acc`` (accuracy on the validation
    split held out from the training data), ``removed`` (EASIER: activation sites removed so
    far) and ``batches`` (entropy measurement batches used, with ``--measure auto``).

    Args:
        rounds: the ``rounds`` list of report.json.

    Returns:
        Fixed-width text, one line per round plus a header.

    Example:
        >>> print(round_table([{"round": 0, "sparsity": 0.0, "accuracy": 0.99, "n_zero": 0,
        ...                     "n_sites": 17, "seconds": 12.0}]))  # doctest: +NORMALIZE_WHITESPACE
        round  sparsity  accuracy  zero-H sites     time
            0      0.0%     99.0%          0/17    12.0s
    """
    val = any(r.get("val_accuracy") is not None for r in rounds)
    removed = any("n_removed" in r for r in rounds)
    batches = any(r.get("measure_stopped_early") is not None for r in rounds)
    head = f"{'round':>5}  {'sparsity':>8}  {'accuracy':>8}  {'zero-H sites':>12}  {'time':>7}"
    head += f"  {'val acc':>7}" * val + f"  {'removed':>7}" * removed + f"  {'batches':>7}" * batches
    lines = [head]
    for r in rounds:
        zero = f"{r.get('n_zero', 0)}/{r.get('n_sites', 0)}"
        line = (f"{r['round']:>5}  {_pct(r.get('sparsity')):>8}  {_pct(r.get('accuracy')):>8}  "
                f"{zero:>12}  {r.get('seconds', 0.0):>6.1f}s")
        if val:
            line += f"  {_pct(r.get('val_accuracy')):>7}"
        if removed:
            line += f"  {r.get('n_removed', 0):>7}"
        if batches:
            line += f"  {'-' if r.get('measure_batches') is None else r['measure_batches']:>7}"
        lines.append(line)
    return "\n".join(lines)


def epoch_line(rec: dict, epochs: int | None = None) -> str:
    """One training epoch as one plain line (a run's log when no progress bar is drawn).

    Args:
        rec: an epoch record (``metrics.csv`` row): ``phase``, ``round`` (optional), ``epoch``,
            ``train_loss``, ``train_acc``, ``test_acc`` (optional), ``seconds``.
        epochs: epochs of the phase, shown as ``epoch 3/15``.

    Returns:
        One line: phase, round, epoch, training loss and accuracy, test accuracy, seconds.

    Example:
        >>> print(epoch_line({"phase": "finetune", "round": 1, "epoch": 2, "train_loss": 0.41234,
        ...                   "train_acc": 0.881, "test_acc": 0.902, "seconds": 1.26}, epochs=8))
        finetune round 1 epoch 2/8  loss 0.4123  train acc 88.1%  test acc 90.2%  1.3s
    """
    where = rec["phase"] + ("" if rec.get("round") is None else f" round {rec['round']}")
    line = f"{where} epoch {rec['epoch']}{'' if epochs is None else f'/{epochs}'}"
    line += f"  loss {rec['train_loss']:.4f}  train acc {_pct(rec.get('train_acc'))}"
    if rec.get("test_acc") is not None:
        line += f"  test acc {_pct(rec['test_acc'])}"
    return line + f"  {rec.get('seconds', 0.0):.1f}s"


def round_line(rec: dict) -> str:
    """One finished round as one plain line (a run's log when no progress bar is drawn).

    Args:
        rec: a round record of report.json.

    Returns:
        One line: round, sparsity, sites at zero entropy (and EASIER's removed sites), test
        accuracy, validation accuracy when held out, seconds (and the time split, when recorded).

    Example:
        >>> print(round_line({"round": 1, "sparsity": 0.5, "accuracy": 0.97, "val_accuracy": 0.96,
        ...                   "n_zero": 3, "n_sites": 17, "seconds": 12.04}))
        round 1  sparsity 50.0%  zero-entropy sites 3/17  accuracy 97.0%  val acc 96.0%  12.0s
    """
    line = (f"round {rec['round']}  sparsity {_pct(rec.get('sparsity'))}  "
            f"zero-entropy sites {rec.get('n_zero', 0)}/{rec.get('n_sites', 0)}")
    if "n_removed" in rec:
        line += f"  removed sites {rec['n_removed']}"
    line += f"  accuracy {_pct(rec.get('accuracy'))}"
    if rec.get("val_accuracy") is not None:
        line += f"  val acc {_pct(rec['val_accuracy'])}"
    line += f"  {rec.get('seconds', 0.0):.1f}s"
    return line + (f" ({time_short(rec['time'])})" if rec.get("time") else "")


def summary_text(report: dict) -> str:
    """The final summary: accuracy dense -> pruned -> collapsed, sites and depth, latency, wall time.

    Args:
        report: a report.json dict.

    Returns:
        A few lines of text.

    Example:
        >>> print(summary_text({"config": {"method": "egp", "data": "digits", "model": "m"},
        ...                     "summary": {"acc_dense": 0.99, "acc_pruned": 0.98}}))
        summary: egp on digits, m
        accuracy: dense 99.0% -> pruned 98.0%
        sparsity: - of prunable weights; zero-entropy sites -/-
    """
    s = report.get("summary") or {}
    cfg = report.get("config") or {}
    head = f"summary: {cfg.get('method', '?')} on {cfg.get('data', '?')}, {cfg.get('model', '?')}"
    if cfg.get("model") == "cifar_resnet18":
        head += f" (width {cfg.get('width')})"
    lines = [head]
    after = "sites removed" if cfg.get("method") == "easier" else "pruned"
    acc = f"accuracy: dense {_pct(s.get('acc_dense'))} -> {after} {_pct(s.get('acc_pruned'))}"
    if s.get("acc_collapsed") is not None:
        acc += f" -> collapsed {_pct(s.get('acc_collapsed'))}"
    lines.append(acc)
    if s.get("val_acc_dense") is not None:
        lines.append(f"validation (held out from training): dense {_pct(s.get('val_acc_dense'))} -> "
                     f"{after} {_pct(s.get('val_acc_pruned'))}")
    if cfg.get("method") == "easier" and "best_round" in s:
        lines.append(f"easier: kept step {s['best_round']} with {len(s.get('easier_removed') or [])} sites "
                     f"removed (max drop {100 * cfg.get('max_drop', 0):g} pt); stopped: {s.get('stopped')}"
                     + ("" if s.get("easier_predicted_speedup") is None else "; speed-up predicted "
                        f"{s['easier_predicted_speedup']:.2f}x, measured {_times(s.get('easier_measured_speedup'))}"))
    else:
        lines.append(f"sparsity: {_pct(s.get('sparsity'))} of prunable weights; zero-entropy sites "
                     f"{s.get('zero_sites', '-')}/{s.get('sites_before', '-')}")
    if s.get("sites_after") is not None:
        lines.append(f"sites: {s.get('sites_before')} -> {s.get('sites_after')}; depth (weight layers on the "
                     f"longest path): {s.get('depth_before', '-')} -> {s.get('depth_after', '-')}")
    lines.extend(_evidence_lines(s))
    if s.get("acc_fold_after") is not None:
        lines.append(f"fold-finetune ({cfg.get('fold_epochs', '?')} epochs on the collapsed model): "
                     f"{_pct(s.get('acc_fold_before'))} -> {_pct(s.get('acc_fold_after'))}")
    for key, bs in (("", s.get("latency_batch")), ("_b1", 1)):
        if s.get(f"latency{key}_pruned_ms") is None or (key and s.get("latency_batch") == 1):
            continue
        lat = f"latency (batch {bs}, {s.get('device', '?')}"
        if s.get(f"latency{key}_rounds"):
            lat += f", interleaved x{s[f'latency{key}_rounds']}"
        lat += f"): pruned {s[f'latency{key}_pruned_ms']:.2f} ms"
        if s.get(f"latency{key}_collapsed_ms") is not None:
            lat += f" -> collapsed {s[f'latency{key}_collapsed_ms']:.2f} ms"
        sp, iqr = s.get(f"latency{key}_speedup"), s.get(f"latency{key}_speedup_iqr")
        if sp is not None:
            lat += f", {sp:.2f}x" + (f" (IQR {iqr[0]:.2f}-{iqr[1]:.2f})" if iqr else "")
            if s.get(f"latency{key}_inside_noise"):
                lat += ": inside the noise, no measurable difference"
        lines.append(lat)
    lines.extend(time_lines(s))
    if s.get("wall_seconds") is not None:
        lines.append(f"wall time: {s['wall_seconds']:.1f} s")
    return "\n".join(lines)


def _evidence_lines(s: dict) -> list[str]:
    """How sure the collapse was: flip bounds of the collapsed sites, held-out flips, weak sites."""
    rows = [r for r in s.get("evidence") or [] if r.get("samples") is not None]
    out = []
    earlier = len(s.get("evidence") or []) - len(rows)
    if earlier:
        out.append(f"folded: {earlier} site(s) removed earlier by the method (identity/majority maps: no "
                   "zero-entropy evidence needed)")
    bounds = [r["flip_bound"] for r in rows if r.get("flip_bound") is not None]
    if rows:
        line = f"evidence: {len(rows)} collapsed site(s)"
        if bounds:
            n = min(r["samples"] for r in rows if r.get("samples") is not None)
            line += (f", flip bound <= {100 * max(bounds):.2g}% at {100 * s.get('confidence', 0.95):g}% "
                     f"confidence (>= {n} samples)")
        held = [r for r in rows if r.get("held_out_samples")]
        if held:
            flipped = sum(r.get("held_out_flipped") or 0 for r in held)
            worst = max(r.get("held_out_flip_rate") or 0.0 for r in held)
            line += (f"; held-out check: {flipped} flipped sample(s) over {held[0]['held_out_samples']} "
                     f"(worst site {100 * worst:.2g}%)")
        out.append(line)
    weak = s.get("left_weak") or []
    if weak:
        out.append(f"left in place for weak evidence (max flip {100 * s.get('max_flip', 0.01):g}%): "
                   + "; ".join(f"{w['site']}: {w['reason']}" for w in weak[:3])
                   + (f"; and {len(weak) - 3} more" if len(weak) > 3 else ""))
    return out


def _label(run: dict) -> str:
    cfg = run.get("config") or {}
    opts = cfg.get("options", cfg)  # config.json nests the options; report.json's config is them
    if "method" not in opts:
        opts = (run.get("report") or {}).get("config") or {}
    return f"{opts.get('method', '?')}:{run['name']}"


def compare_table(runs: Sequence[dict]) -> str:
    """Side-by-side per-round comparison of several runs (sparsity, accuracy, zero-entropy sites).

    Args:
        runs: dicts from :func:`load_run`.

    Returns:
        Fixed-width text; runs without a report show ``-``.

    Example:
        >>> runs = [{"name": n, "config": {"method": n}, "report": {"rounds": [
        ...     {"sparsity": 0.5, "accuracy": 0.98, "n_zero": z, "n_sites": 17}]}} for n, z in (("egp", 2), ("imp", 0))]
        >>> print(compare_table(runs).splitlines()[2].split())
        ['0', '50.0%', '98.0%', '2/17', '50.0%', '98.0%', '0/17']
    """
    labels = [_label(r) for r in runs]
    width = max(24, *(len(x) for x in labels))
    head = f"{'round':>5}  " + "  ".join(f"{x:>{width}}" for x in labels)
    sub = f"{'':>5}  " + "  ".join(f"{'sparsity  acc  zero-H':>{width}}" for _ in labels)
    n = max((len((r.get("report") or {}).get("rounds", [])) for r in runs), default=0)
    lines = [head, sub]
    for i in range(n):
        cells = []
        for r in runs:
            rounds = (r.get("report") or {}).get("rounds", [])
            if i < len(rounds):
                x = rounds[i]
                cells.append(f"{_pct(x.get('sparsity'))}  {_pct(x.get('accuracy'))}  "
                             f"{x.get('n_zero', 0)}/{x.get('n_sites', 0)}")
            else:
                cells.append("-")
        lines.append(f"{i:>5}  " + "  ".join(f"{c:>{width}}" for c in cells))
    finals = []
    for r in runs:
        s = (r.get("report") or {}).get("summary") or {}
        if s.get("acc_collapsed") is not None:
            finals.append(f"collapsed {_pct(s.get('acc_collapsed'))}, sites {s.get('sites_after')}")
        else:
            finals.append("-")
    lines.append(f"{'final':>5}  " + "  ".join(f"{c:>{width}}" for c in finals))
    return "\n".join(lines)
