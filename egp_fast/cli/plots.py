"""PNG plots of ``egp-fast`` runs: the entropy heatmap and the sparsity curves.

matplotlib is imported lazily with the Agg backend, so nothing here needs a display, and a
missing matplotlib is reported as a ConfigError naming the package to install.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

from egp_fast.cli.checkpoints import atomic_write_bytes
from egp_fast.cli.report import _label
from egp_fast.errors import ConfigError

__all__ = ["plot_entropy_heatmap", "plot_sparsity_curves", "render_run"]


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
        >>> import tempfile
        >>> rounds = [{"round": i, "entropy": {"relu": 0.9 - 0.45 * i, "layer1.0.relu1": 0.5}} for i in range(3)]
        >>> plot_entropy_heatmap({"rounds": rounds}, os.path.join(tempfile.mkdtemp(), "h.png"))
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
        >>> import tempfile
        >>> rounds = [{"sparsity": 1 - 0.5 ** i, "accuracy": 0.99 - 0.01 * i, "n_zero": i} for i in range(3)]
        >>> plot_sparsity_curves([{"name": "a", "config": {"method": "egp"}, "report": {"rounds": rounds}}],
        ...                      os.path.join(tempfile.mkdtemp(), "c.png"))
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
        >>> import tempfile
        >>> rounds = [{"round": i, "sparsity": 1 - 0.5 ** i, "accuracy": 0.99, "entropy": {"relu": 0.5}}
        ...           for i in range(2)]
        >>> paths = render_run({"dir": tempfile.mkdtemp(), "name": "a", "report": {"rounds": rounds}})
        >>> [os.path.basename(p) for p in paths]
        ['entropy_heatmap.png', 'sparsity_curves.png']
    """
    report = run.get("report")
    if not report or not report.get("rounds"):
        return []
    heat = os.path.join(run["dir"], "entropy_heatmap.png")
    curves = os.path.join(run["dir"], "sparsity_curves.png")
    plot_entropy_heatmap(report, heat)
    plot_sparsity_curves([run], curves)
    return [heat, curves]
