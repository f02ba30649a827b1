"""Run outputs of ``egp-fast``: metrics.csv, report.json, tables, plots and run comparison.

A run directory holds ``config.json`` (every option), ``metrics.csv`` (one row per epoch),
``report.json`` (one record per round, the collapse result and a summary) and PNG plots.
matplotlib is imported lazily with the Agg backend, so nothing here needs a display.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from egp_fast.errors import CheckpointError, ConfigError
from egp_fast.train import atomic_write_bytes, atomic_write_text

__all__ = [
    "METRIC_FIELDS",
    "compare_table",
    "load_run",
    "plot_entropy_heatmap",
    "plot_sparsity_curves",
    "render_run",
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
        >>> run = load_run("runs/egp-digits")   # doctest: +SKIP
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


def round_table(rounds: Sequence[dict]) -> str:
    """The per-round table: round, sparsity, accuracy, zero-entropy sites, time.

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
    lines = [f"{'round':>5}  {'sparsity':>8}  {'accuracy':>8}  {'zero-H sites':>12}  {'time':>7}"]
    for r in rounds:
        zero = f"{r.get('n_zero', 0)}/{r.get('n_sites', 0)}"
        lines.append(f"{r['round']:>5}  {_pct(r.get('sparsity')):>8}  {_pct(r.get('accuracy')):>8}  "
                     f"{zero:>12}  {r.get('seconds', 0.0):>6.1f}s")
    return "\n".join(lines)


def summary_text(report: dict) -> str:
    """The final summary: accuracy dense -> pruned -> collapsed, sites and depth, latency, wall time.

    Args:
        report: a report.json dict.

    Returns:
        A few lines of text.

    Example:
        >>> print(summary_text({"config": {"method": "egp"}, "summary": {"acc_dense": 0.99}}))  # doctest: +SKIP
    """
    s = report.get("summary") or {}
    cfg = report.get("config") or {}
    head = f"summary: {cfg.get('method', '?')} on {cfg.get('data', '?')}, {cfg.get('model', '?')}"
    if cfg.get("model") == "cifar_resnet18":
        head += f" (width {cfg.get('width')})"
    lines = [head]
    acc = f"accuracy: dense {_pct(s.get('acc_dense'))} -> pruned {_pct(s.get('acc_pruned'))}"
    if s.get("acc_collapsed") is not None:
        acc += f" -> collapsed {_pct(s.get('acc_collapsed'))}"
    lines.append(acc)
    lines.append(f"sparsity: {_pct(s.get('sparsity'))} of prunable weights; zero-entropy sites "
                 f"{s.get('zero_sites', '-')}/{s.get('sites_before', '-')}")
    if s.get("sites_after") is not None:
        lines.append(f"sites: {s.get('sites_before')} -> {s.get('sites_after')}; depth (weight layers on the "
                     f"longest path): {s.get('depth_before', '-')} -> {s.get('depth_after', '-')}")
    if s.get("latency_pruned_ms") is not None:
        lat = f"latency (batch {s.get('latency_batch')}, {s.get('device', '?')}): pruned " \
              f"{s['latency_pruned_ms']:.2f} ms"
        if s.get("latency_collapsed_ms") is not None:
            lat += f" -> collapsed {s['latency_collapsed_ms']:.2f} ms"
        lines.append(lat)
    if s.get("wall_seconds") is not None:
        lines.append(f"wall time: {s['wall_seconds']:.1f} s")
    return "\n".join(lines)


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
        >>> print(compare_table([load_run("runs/a"), load_run("runs/b")]))  # doctest: +SKIP
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


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:  # optional dependency: plots are skipped with this message
        raise ConfigError("plots need matplotlib: pip install matplotlib (or egp_fast[demo])") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_entropy_heatmap(report: dict, path: str | os.PathLike) -> None:
    """Per-site entropy over rounds as a heatmap (rows: sites in execution order; columns: rounds).

    Zero-entropy cells are marked with a dot so collapsible sites stand out.

    Args:
        report: a report.json dict with ``rounds[*].entropy`` (site -> entropy).
        path: PNG destination.

    Example:
        >>> plot_entropy_heatmap(load_run("runs/a")["report"], "/tmp/h.png")  # doctest: +SKIP
    """
    import numpy as np

    plt = _pyplot()
    rounds = report.get("rounds", [])
    sites: list[str] = []
    for r in rounds:
        for s in r.get("entropy", {}):
            if s not in sites:
                sites.append(s)
    grid = np.full((len(sites), len(rounds)), np.nan)
    for j, r in enumerate(rounds):
        for i, s in enumerate(sites):
            v = r.get("entropy", {}).get(s)
            if v is not None:
                grid[i, j] = v
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * max(len(rounds), 1), 1.0 + 0.28 * max(len(sites), 1)))
    try:
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(1.0, float(np.nanmax(grid))
                                                                             if grid.size else 1.0))
        ys, xs = np.where(grid == 0)
        ax.scatter(xs, ys, marker="o", s=14, c="white", edgecolors="black", linewidths=0.5,
                   label="zero entropy")
        ax.set_xticks(range(len(rounds)), [str(r["round"]) for r in rounds])
        ax.set_yticks(range(len(sites)), sites, fontsize=7)
        ax.set_xlabel("round (0 = dense)")
        cfg = report.get("config") or {}
        ax.set_title(f"layer entropy (bits), {cfg.get('method', '')}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
        _save_png(fig, os.fspath(path))
    finally:
        plt.close(fig)


def plot_sparsity_curves(runs: Sequence[dict], path: str | os.PathLike) -> None:
    """Accuracy and zero-entropy site count against sparsity, one line per run (EGP vs IMP).

    Args:
        runs: dicts from :func:`load_run` (or ``{"name", "config", "report"}``).
        path: PNG destination.

    Example:
        >>> plot_sparsity_curves([load_run("runs/egp"), load_run("runs/imp")], "/tmp/c.png")  # doctest: +SKIP
    """
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    try:
        for run in runs:
            rounds = (run.get("report") or {}).get("rounds", [])
            if not rounds:
                continue
            sp = [100 * r["sparsity"] for r in rounds]
            label = _label(run)
            ax1.plot(sp, [100 * r["accuracy"] for r in rounds], marker="o", label=label)
            ax2.plot(sp, [r.get("n_zero", 0) for r in rounds], marker="o", label=label)
        ax1.set_xlabel("sparsity of prunable weights (%)")
        ax1.set_ylabel("test accuracy (%)")
        ax2.set_xlabel("sparsity of prunable weights (%)")
        ax2.set_ylabel("zero-entropy sites")
        from matplotlib.ticker import MaxNLocator

        ax2.yaxis.set_major_locator(MaxNLocator(integer=True))  # a count of sites
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        _save_png(fig, os.fspath(path))
    finally:
        plt.close(fig)


def render_run(run: dict) -> list[str]:
    """(Re)write a run's plots into its directory.

    Args:
        run: a dict from :func:`load_run` with a report.

    Returns:
        Paths of the PNGs written.

    Example:
        >>> render_run(load_run("runs/a"))  # doctest: +SKIP
    """
    report = run.get("report")
    if not report or not report.get("rounds"):
        return []
    heat = os.path.join(run["dir"], "entropy_heatmap.png")
    curves = os.path.join(run["dir"], "sparsity_curves.png")
    plot_entropy_heatmap(report, heat)
    plot_sparsity_curves([run], curves)
    return [heat, curves]
