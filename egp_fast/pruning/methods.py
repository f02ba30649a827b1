"""The weight-pruning methods of the loop in :mod:`egp_fast.prune`: EGP and IMP.

A method is a small strategy object: ``layers(pruner)`` (the layers that get masks),
``plan(pruner, stats, remaining)`` (what a round changes), ``apply(pruner, plan, stats)`` (do
it; returns the sites removed) and ``progressed(record)`` (did the round change anything).
EASIER, which removes activation sites instead, is :class:`egp_fast.pruning.EasierMethod`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from egp_fast.masks import core as _masks
from egp_fast import ops
from egp_fast.pruning.budget import allocate, round_budget
from egp_fast.pruning.easier import EasierMethod
from egp_fast.errors import ConfigError
from egp_fast.graph import weight_layers
from egp_fast.ops._dispatch import backend_for
from egp_fast.pruning.records import RoundRecord
from egp_fast.measurement import EntropyStats

if TYPE_CHECKING:
    from egp_fast.pruning.pruner import Pruner

class _WeightMethod:
    """Shared by EGP and IMP: a round prunes a budget of weights; masks hold them at zero."""

    name = ""
    prunes_weights = True

    def apply(self, pruner: Pruner, plan: dict[str, int], stats: EntropyStats | None) -> list[str]:
        view = pruner._layer_view()
        unknown = [n for n in plan if n not in view]
        if unknown:
            raise ConfigError(
                f"plan names layers this pruner does not prune: {unknown[:5]}; prunable layers "
                f"are {list(view)[:5]}{'...' if len(view) > 5 else ''}"
            )
        names = [n for n in view if plan.get(n, 0)]
        if names:
            new = ops.select_smallest(
                [view[n][0] for n in names],
                [view[n][1] for n in names],
                [int(plan[n]) for n in names],
                backend=backend_for("select_smallest", pruner.backend),
            )
            _masks.set_masks(pruner.model, dict(zip(names, new)))
        return []

    def progressed(self, record: RoundRecord) -> bool:
        return record.pruned > 0


def layer_magnitudes(view: dict[str, tuple[torch.Tensor, torch.Tensor]], remaining: dict[str, int]) -> dict[str, float]:
    """Layer -> mean ``|w|`` over its kept weights (0.0 for a layer with none left)."""
    magnitude = {}
    for n, (w, _) in view.items():
        kept = remaining[n]
        # Pruned weights are exactly zero (masks are enforced), so the L1 norm of the whole
        # weight is the sum of |w| over the kept ones: no masked temporary needed.
        magnitude[n] = float(torch.linalg.vector_norm(w.detach(), 1)) / kept if kept else 0.0
    return magnitude


class _EGPMethod(_WeightMethod):
    """EGP: the budget goes to the producers of live sites, shared by entropy and magnitude."""

    name = "egp"

    def layers(self, pruner: Pruner) -> list[str]:
        return pruner._graph.producer_layers()

    def plan(self, pruner: Pruner, stats: EntropyStats, remaining: dict[str, int]) -> dict[str, int]:
        view = pruner._layer_view()
        layer_h = stats.layer_entropy()
        missing = [n for n in view if n not in layer_h]
        entropy = {n: layer_h.get(n, 0.0) for n in view}
        if missing and len(missing) == len(view):
            raise ConfigError(
                "stats does not describe this model's prunable layers (no site produced by "
                f"{missing[:3]}); measure with this pruner's measure()"
            )
        magnitude = layer_magnitudes(view, remaining)
        return allocate(entropy, magnitude, remaining, round_budget(entropy, remaining, pruner.step))


class _IMPMethod(_WeightMethod):
    """IMP: one global magnitude threshold over every Conv/Linear layer."""

    name = "imp"

    def layers(self, pruner: Pruner) -> list[str]:
        return weight_layers(pruner.model)

    def plan(self, pruner: Pruner, stats: EntropyStats, remaining: dict[str, int]) -> dict[str, int]:
        view = pruner._layer_view()
        count = int(math.floor(pruner.step * sum(remaining.values())))
        names = list(view)
        new = ops.global_smallest(
            [view[n][0] for n in names], [view[n][1] for n in names], count,
            backend=backend_for("global_smallest", pruner.backend),
        )
        return {n: remaining[n] - int(torch.count_nonzero(m)) for n, m in zip(names, new)}


def _make_method(method: str, linearization: str) -> Any:
    if method == "easier":
        return EasierMethod(linearization)
    return _EGPMethod() if method == "egp" else _IMPMethod()
