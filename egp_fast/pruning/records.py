"""What a pruning run records and how it rolls back: RoundRecord, PruneResult, ModelSnapshot.

:class:`RoundRecord` is what one round of :class:`egp_fast.Pruner` did (its per-layer rows come
from :func:`layer_rows`), :class:`PruneResult` what :func:`egp_fast.prune` returns, and
:class:`ModelSnapshot` the state a failed or rolled-back round returns to.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from egp_fast.masks import release
from egp_fast.measurement import EntropyStats

__all__ = ["ModelSnapshot", "PruneResult", "RoundRecord", "layer_rows"]


# --------------------------------------------------------------------------------------------
# Records.


@dataclass
class RoundRecord:
    """What one round (one EASIER iteration) did.

    Attributes:
        iteration: 0-based round index.
        sparsity: fraction of pruned weights over the prunable layers, after the round (0 for
            EASIER, which prunes no weight).
        layers: one dict per prunable layer: ``name``, ``site`` (the site(s) it feeds),
            ``entropy`` (of that site, before pruning), ``nonzero`` (unpruned weights before),
            ``pruned`` (this round), ``collapsible`` (its site is already at zero entropy).
            Empty for EASIER.
        seconds: wall time of the round's measure + plan + apply.
        zero_entropy_sites: sites at zero entropy when the round measured.
        stats: the round's entropy measurement, as ``EntropyStats.to_dict()`` (per-site
            entropies before the round changed anything).
        removed_sites: sites this round replaced by an affine map (EASIER's chosen sites, or
            the zero-entropy sites EGP linearises with ``linearize=True``), execution order.
        accuracy: ``evaluate(model)`` after this round's fine-tuning; ``None`` without
            ``evaluate``.
        kept: False when :func:`prune` rolled this round back (its accuracy fell more than
            ``max_drop`` below the dense accuracy).
        sites_left: activation sites left in the model after the round.
        method: ``"egp"``, ``"imp"`` or ``"easier"``.
        group: EASIER with ``objective="latency"``: the removal group this round chose (the
            live sites whose joint removal lets collapse merge layers; a single site when no
            group saved anything). Empty otherwise.
        predicted_speedup: EASIER with ``objective="latency"``: the fold plan's predicted
            speed-up of the collapsed model after this round over the uncollapsed one (cost of
            the weight layers in FLOPs, or measured layer times with ``fold="latency"``).
        measured_speedup: the same speed-up measured: the model after this round, collapsed,
            timed interleaved against itself uncollapsed on the example batch (median of the
            paired ratios; above 1 is faster). ``None`` when not measured.
    """

    iteration: int
    sparsity: float
    layers: list[dict[str, Any]]
    seconds: float
    zero_entropy_sites: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    removed_sites: list[str] = field(default_factory=list)
    accuracy: float | None = None
    kept: bool = True
    sites_left: int | None = None
    method: str = "egp"
    group: list[str] = field(default_factory=list)
    predicted_speedup: float | None = None
    measured_speedup: float | None = None

    @property
    def pruned(self) -> int:
        """Weights pruned in this round."""
        return sum(layer["pruned"] for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form of the record."""
        return {
            "iteration": self.iteration,
            "method": self.method,
            "sparsity": self.sparsity,
            "pruned": self.pruned,
            "seconds": self.seconds,
            "zero_entropy_sites": list(self.zero_entropy_sites),
            "removed_sites": list(self.removed_sites),
            "sites_left": self.sites_left,
            "accuracy": self.accuracy,
            "kept": self.kept,
            "group": list(self.group),
            "predicted_speedup": self.predicted_speedup,
            "measured_speedup": self.measured_speedup,
            "layers": [dict(x) for x in self.layers],
            "stats": self.stats,
        }


def layer_rows(
    stats: EntropyStats, prunable: list[str], before: dict[str, int], plan: dict[str, int]
) -> list[dict[str, Any]]:
    """The :attr:`RoundRecord.layers` of a round: one row per prunable layer.

    Args:
        stats: the round's measurement (before anything changed).
        prunable: the pruner's layers, in site order.
        before: unpruned weights per layer before the round.
        plan: the round's plan (``{layer: count}``; a site plan leaves every count 0).

    Example:
        >>> import torch, egp_fast
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> stats = egp_fast.measure_entropy(net, [torch.randn(32, 4)], progress=False)
        >>> row = layer_rows(stats, ["0"], {"0": 32}, {"0": 16})[0]
        >>> row["site"], row["nonzero"], row["pruned"]
        ('1', 32, 16)
    """
    sites_of: dict[str, list[str]] = {}
    for s in stats.sites.values():
        for p in s.producers:
            sites_of.setdefault(p, []).append(s.name)
    zero = set(stats.zero_entropy_sites())
    layer_h = stats.layer_entropy()
    rows = []
    for n in prunable:
        sites = sites_of.get(n, [])
        rows.append(
            {
                "name": n,
                "site": ",".join(sites),
                "entropy": layer_h.get(n),
                "nonzero": before.get(n, 0),
                "pruned": int(plan.get(n, 0)),
                "collapsible": bool(sites) and all(s in zero for s in sites),
            }
        )
    return rows


@dataclass
class PruneResult:
    """Result of :func:`prune`.

    Attributes:
        model: the pruned model (the same object that was passed), or the collapsed model
            when ``collapse=True``.
        rounds: one :class:`RoundRecord` per round run (a round rolled back by the accuracy
            tolerance is listed with ``kept=False``).
        stats: the entropy measurement of the returned model (what collapse used); ``None``
            in the partial result of :class:`~egp_fast.errors.PruneInterrupted`.
        collapse: the :class:`~egp_fast.CollapseResult`, when ``collapse=True``.
        config: the arguments of the run, JSON-safe.
        dense_accuracy: ``evaluate(model)`` before the first round (``None`` without evaluate).
        best_round: index in ``rounds`` of the round whose model is returned; ``-1`` when it is
            the model as passed (the first round already fell outside the tolerance).
    """

    model: nn.Module
    rounds: list[RoundRecord]
    stats: EntropyStats | None = None
    collapse: Any = None
    config: dict[str, Any] = field(default_factory=dict)
    dense_accuracy: float | None = None
    best_round: int = -1

    @property
    def removed_sites(self) -> list[str]:
        """Every site removed by the kept rounds, in the order they were removed."""
        return [s for r in self.rounds if r.kept for s in r.removed_sites]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary: config, rounds, final entropies and the collapse report."""
        return {
            "config": dict(self.config),
            "dense_accuracy": self.dense_accuracy,
            "best_round": self.best_round,
            "removed_sites": self.removed_sites,
            "rounds": [r.to_dict() for r in self.rounds],
            "final": self.stats.to_dict() if self.stats is not None else None,
            "collapse": self.collapse.to_dict() if hasattr(self.collapse, "to_dict") else None,
        }


# --------------------------------------------------------------------------------------------
# Snapshot: the state a failed or rolled-back round returns to.


class ModelSnapshot:
    """Structure, hooks, flags and tensor values of a model, restorable later.

    Restores what pruning and linearisation change: submodules (sites replaced by
    :class:`~egp_fast.folding.ChannelAffine` or rewritten callers), parameters and
    buffers (weights, masks) and their values, forward hooks, ``training`` flags, and the
    graph of a root ``fx.GraphModule`` edited in place. Values are copied to the CPU (a GPU
    model does not need twice its memory); :meth:`take` on an existing snapshot reuses its
    CPU buffers for tensors it has seen, so a snapshot per round allocates nothing new once
    the model stops changing shape.

    Args:
        model: the module to record (recorded at construction).

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 2)
        >>> snap = ModelSnapshot(net)
        >>> with torch.no_grad():
        ...     _ = net.weight.zero_()
        >>> snap.restore()
        >>> bool((net.weight != 0).any())
        True
    """

    def __init__(self, model: nn.Module) -> None:
        self.values: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.take(model)

    def take(self, model: nn.Module) -> ModelSnapshot:
        """Record ``model`` now (replacing what was recorded before).

        ``complete`` is False while this runs: a snapshot interrupted half-way (Ctrl-C) holds
        a mix of two states and must not be restored, while the model itself is untouched.
        """
        self.complete = False
        self.root = model
        self.modules = [
            (
                m,
                OrderedDict(m._modules),
                OrderedDict(m._parameters),
                OrderedDict(m._buffers),
                OrderedDict(m._forward_pre_hooks),
                OrderedDict(m._forward_hooks),
                m.training,
            )
            for m in model.modules()
        ]
        # Only the root can be edited in place as a graph (folding/linearizer.py, _rewrite_caller);
        # every other rewrite builds a new GraphModule, restored through _modules.
        self.graph = (copy.deepcopy(model.graph), model.code) if isinstance(model, fx.GraphModule) else None
        old = {id(t): (t, v) for t, v in self.values}
        values: list[tuple[torch.Tensor, torch.Tensor]] = []
        seen: set[int] = set()
        with torch.no_grad():
            for m in model.modules():
                for t in list(m._parameters.values()) + list(m._buffers.values()):
                    if t is None or id(t) in seen:
                        continue
                    seen.add(id(t))
                    prev = old.get(id(t))
                    if prev is not None and prev[0] is t and prev[1].shape == t.shape and prev[1].dtype == t.dtype:
                        prev[1].copy_(t.detach())
                        values.append((t, prev[1]))
                    else:
                        values.append((t, t.detach().to("cpu", copy=True)))
        self.values = values
        self.complete = True
        return self

    def restore(self) -> None:
        """Put the recorded structure and values back."""
        for m, mods, params, bufs, pre, fwd, training in self.modules:
            for d, saved in (
                (m._modules, mods),
                (m._parameters, params),
                (m._buffers, bufs),
                (m._forward_pre_hooks, pre),
                (m._forward_hooks, fwd),
            ):
                d.clear()
                d.update(saved)
            m.training = training
        if self.graph is not None and self.root.code != self.graph[1]:
            self.root.graph = copy.deepcopy(self.graph[0])
            self.root.recompile()
        with torch.no_grad():
            for t, v in self.values:
                t.copy_(v.to(t.device))
        release(self.root)

