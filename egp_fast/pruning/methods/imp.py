"""IMP, the iterative magnitude pruning baseline: one global magnitude threshold per round.

Each round prunes ``step`` of the remaining weights of every Conv/Linear layer, the smallest
``|w|`` over all of them together; the entropies play no part.
"""

from __future__ import annotations

import math

import torch.nn as nn

from egp_fast import ops
from egp_fast.errors import ConfigError
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
        if set(options) - {"linearization"}:  # the Pruner passes linearization to every method
            raise ConfigError(f"method='imp' takes no options, got {sorted(set(options) - {'linearization'})}; "
                              "objective/target_speedup/fold/exact are options of method='easier'")

    def layers(self, model: nn.Module, graph: SiteGraph) -> list[str]:
        """Every Conv/Linear layer of the model."""
        return weight_layers(model)

    def plan(self, ctx: MethodContext, stats: EntropyStats, remaining: dict[str, int]) -> dict[str, int]:
        """Layer -> weights below the global threshold that prunes ``step`` of the remaining ones.

        Only the per-layer counts of the global selection are computed
        (:func:`egp_fast.ops.global_smallest_counts`): no mask of the whole model is held;
        :meth:`apply` then makes the masks a group of layers at a time.
        """
        view = ctx.layers
        count = int(math.floor(ctx.step * sum(remaining.values())))
        names = list(view)
        counts = ops.global_smallest_counts(
            [view[n][0] for n in names], [view[n][1] for n in names], count,
            backend=backend_for("global_smallest_counts", ctx.backend),
        )
        return dict(zip(names, counts))
