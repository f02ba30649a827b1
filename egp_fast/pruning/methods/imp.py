"""IMP, the iterative magnitude pruning baseline: one global magnitude threshold per round.

Each round prunes ``step`` of the remaining weights of every Conv/Linear layer, the smallest
``|w|`` over all of them together; the entropies play no part.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from egp_fast import ops
from egp_fast.graph import SiteGraph, weight_layers
from egp_fast.measurement import EntropyStats
from egp_fast.ops import backend_for
from egp_fast.pruning.methods.base import MethodContext, WeightMethod

__all__ = ["IMPMethod"]


class IMPMethod(WeightMethod):
    """IMP: one global magnitude threshold over every Conv/Linear layer.

    Its plan reads no entropy (``needs_entropy`` is False): ``stop="decided"`` waits for the
    sites alone. Registered as ``method="imp"``.

    Example:
        >>> IMPMethod().name, IMPMethod().needs_entropy
        ('imp', False)
    """

    name = "imp"
    needs_entropy = False

    def __init__(self, **options: object) -> None:
        pass  # no option of its own

    def layers(self, model: nn.Module, graph: SiteGraph) -> list[str]:
        """Every Conv/Linear layer of the model."""
        return weight_layers(model)

    def plan(self, ctx: MethodContext, stats: EntropyStats, remaining: dict[str, int]) -> dict[str, int]:
        """Layer -> weights below the global threshold that prunes ``step`` of the remaining ones."""
        view = ctx.layers
        count = int(math.floor(ctx.step * sum(remaining.values())))
        names = list(view)
        new = ops.global_smallest(
            [view[n][0] for n in names], [view[n][1] for n in names], count,
            backend=backend_for("global_smallest", ctx.backend),
        )
        return {n: remaining[n] - int(torch.count_nonzero(m)) for n, m in zip(names, new)}
