"""Where a run's time goes: each round's wall time split into its phases.

The run times every phase with a :class:`PhaseClock` (CUDA is synchronised at each phase's
edges, so queued kernels count where they were launched). A round's record in ``report.json``
gets ``time``: seconds per phase, plus ``other`` (checkpoints, progress output, anything not in
a phase), so the values add up to the round's ``seconds``; the summary gets the totals over the
run and EGP's own share of a fine-tune epoch (:func:`time_summary`).

Phases:

* ``setup``: loading the data, building and tracing the model (round 0 only);
* ``train``: the dense epochs (round 0) or the round's fine-tune epochs; fold-finetune at the
  end of the run;
* ``eval``: test and validation accuracy;
* ``measure``: the entropy measurement (with ``--measure auto`` it stops once decided); with
  ``--measure track`` the signs are counted inside the round's last ``train`` epoch, and
  ``measure`` is only the summing of those counts over the ranks (the round record's
  ``measure_source`` says ``"track"``, or ``"pass"`` where the run measured with a pass);
* ``select``: the round's plan (which weights to prune, ``Pruner.plan``);
* ``masks``: applying it (``Pruner.apply``, the ranks' masks check; EASIER's site swap);
* ``collapse``: folding the zero-entropy sites (with its held-out check) at the end;
* ``latency``: timing the pruned and collapsed models at the end;
* ``save``: writing the pruned and collapsed models at the end.

With several processes the report gives rank 0's split (rank 0 writes it). Every phase that
all ranks run ends at a collective (the gradient and count ``all_reduce``), so rank 0's time for
it includes any wait for a slower rank: it is the job's time. A per-phase maximum over the ranks
would count twice the work only rank 0 does: while rank 0 times the models (``latency``), the
other ranks wait in their next evaluation.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import torch

__all__ = ["PHASES", "PhaseClock", "round_split", "time_lines", "time_short", "time_summary"]

#: phases in report order, with the label the summary prints
PHASES = {"setup": "setup", "train": "training", "eval": "evaluation", "measure": "measurement",
          "select": "selection", "masks": "masks", "collapse": "collapse", "latency": "latency",
          "save": "saving models"}
#: EGP's own work in a round
EGP_PHASES = ("measure", "select", "masks")


class PhaseClock:
    """Adds each phase's wall time into a dict (the run state's, so checkpoints keep it).

    Args:
        device: the compute device; CUDA is synchronised at the start and end of each phase.

    Example:
        >>> clock = PhaseClock(torch.device("cpu"))
        >>> times = {}
        >>> with clock.phase(times, "train"):
        ...     pass
        >>> sorted(times)
        ['train']
    """

    def __init__(self, device: torch.device) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else None

    @contextlib.contextmanager
    def phase(self, into: dict, name: str) -> Iterator[None]:
        """Time the block and add its seconds to ``into[name]``."""
        if name not in PHASES:
            raise KeyError(f"unknown phase {name!r}; one of {', '.join(PHASES)}")
        if self.sync is not None:
            self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync is not None:
                self.sync()
            into[name] = into.get(name, 0.0) + time.perf_counter() - t0


def round_split(times: dict, seconds: float) -> dict:
    """A round's seconds per phase plus ``other``, adding up to ``seconds``.

    Args:
        times: this rank's seconds per phase.
        seconds: the round's wall time on this rank.

    Returns:
        ``{phase: seconds}`` for every phase in :data:`PHASES` and ``other`` (never negative).

    Example:
        >>> round_split({"train": 3.0, "measure": 0.5}, 4.0)["other"]
        0.5
    """
    vals = [float(times.get(p, 0.0)) for p in PHASES]
    out = dict(zip(PHASES, vals))
    out["other"] = max(0.0, float(seconds) - sum(vals))
    return out


def time_summary(rounds: Sequence[dict], final: dict | None, epochs: int) -> dict:
    """Totals over the run and EGP's own share of one fine-tune epoch.

    Args:
        rounds: report.json's round records (with ``time``); round 0 is the dense model.
        final: the end of the run's split (collapse, latency, saving...), or ``None``.
        epochs: fine-tune epochs per round (``--epochs``).

    Returns:
        ``time`` (seconds per phase over the whole run), ``time_final``, and when some round
        was fine-tuned: ``egp_seconds_per_round`` (mean measurement + selection + masks of the
        pruning rounds), ``finetune_epoch_seconds`` (mean fine-tune epoch) and
        ``egp_share_of_epoch`` (their ratio), ``tracked_rounds`` (pruning rounds whose statistics
        were counted during training, ``--measure track``: their counting is inside ``train``,
        their ``measure`` is only the sum of the counts over the ranks).

    Example:
        >>> r = [{"round": 0, "time": {"train": 5.0, "measure": 1.0}},
        ...      {"round": 1, "time": {"train": 20.0, "measure": 0.8, "select": 0.1, "masks": 0.1}}]
        >>> time_summary(r, None, epochs=2)["egp_share_of_epoch"]
        0.1
    """
    total: dict[str, float] = {}
    for part in [r.get("time") or {} for r in rounds] + [final or {}]:
        for k, v in part.items():
            total[k] = total.get(k, 0.0) + v
    out: dict = {"time": total, "time_final": final}
    pruned = [r["time"] for r in rounds if r.get("round", 0) >= 1 and r.get("time")]
    train = sum(t.get("train", 0.0) for t in pruned)
    if pruned and epochs > 0 and train > 0:
        egp = sum(t.get(p, 0.0) for t in pruned for p in EGP_PHASES) / len(pruned)
        epoch = train / (len(pruned) * epochs)
        out.update(egp_seconds_per_round=egp, finetune_epoch_seconds=epoch, egp_share_of_epoch=egp / epoch)
        sources = [r.get("measure_source") for r in rounds if r.get("round", 0) >= 1 and r.get("time")]
        out["tracked_rounds"] = sum(1 for m in sources if m == "track")
    return out


def time_short(split: dict | None) -> str:
    """A round's split in a few words for its log line (empty without a split).

    Example:
        >>> time_short({"train": 10.0, "eval": 1.0, "measure": 0.52, "select": 0.01, "masks": 0.02})
        'train 10.0s, eval 1.0s, measure 0.52s, select+masks 0.03s'
    """
    if not split:
        return ""
    return (f"train {split.get('train', 0.0):.1f}s, eval {split.get('eval', 0.0):.1f}s, "
            f"measure {split.get('measure', 0.0):.2f}s, "
            f"select+masks {split.get('select', 0.0) + split.get('masks', 0.0):.2f}s")


def time_lines(summary: dict) -> list[str]:
    """The summary's time lines: seconds per phase over the run, EGP's share of an epoch.

    Args:
        summary: report.json's ``summary`` (from :func:`time_summary`, plus ``wall_seconds``).

    Returns:
        Zero to two lines.

    Example:
        >>> s = {"time": {"train": 40.0, "measure": 1.0, "select": 0.05, "masks": 0.05, "other": 0.5},
        ...      "egp_seconds_per_round": 1.1, "finetune_epoch_seconds": 40.0, "egp_share_of_epoch": 0.028}
        >>> print("\\n".join(time_lines(s)))
        time: training 40.0 s, measurement 1.0 s, selection 0.05 s, masks 0.05 s, other 0.50 s
        EGP's own work per round (measurement + selection + masks): 1.1 s = 2.8% of one fine-tune epoch (40.0 s)
    """
    t = summary.get("time")
    if not t:
        return []
    parts = [f"{PHASES[p]} {_sec(t[p])}" for p in PHASES if t.get(p)]
    if t.get("other"):
        parts.append(f"other {_sec(t['other'])}")
    ranks = summary.get("world_size") or 1
    lines = [("time" + (f" (rank 0 of {ranks})" if ranks > 1 else "") + ": " + ", ".join(parts))]
    if summary.get("egp_share_of_epoch") is not None:
        lines.append(f"EGP's own work per round (measurement + selection + masks): "
                     f"{_sec(summary['egp_seconds_per_round'])} = {100 * summary['egp_share_of_epoch']:.1f}% of one "
                     f"fine-tune epoch ({_sec(summary['finetune_epoch_seconds'])})")
        if summary.get("tracked_rounds"):
            lines.append(f"({summary['tracked_rounds']} round(s) counted their entropies during their last "
                         "fine-tune epoch (--measure track): the counting is part of their training time, their "
                         "measurement time only sums the counts over the ranks)")
    return lines


def _sec(v: float) -> str:
    return f"{v:.2f} s" if v < 0.995 else f"{v:.1f} s"
