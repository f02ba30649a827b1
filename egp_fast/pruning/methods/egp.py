"""EGP, the entropy-guided method: a round's budget goes to the producers of live sites.

Each round prunes ``step`` of the remaining weights of the layers that feed a site with nonzero
entropy, shared between them by entropy and magnitude (docs/algorithm.md, "One pruning round";
the sharing is :mod:`egp_fast.pruning.budget`). :meth:`EGPMethod.plan` and its
:meth:`~EGPMethod.plan_rule` go through the same two functions, :func:`layer_entropy` and
:func:`layer_magnitudes`, and the same budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from egp_fast.errors import ConfigError
from egp_fast.graph import SiteGraph
from egp_fast.measurement import EntropyStats
from egp_fast.pruning.budget import allocate, round_budget, round_shares
from egp_fast.pruning.methods.base import MethodContext, PlanRule, WeightMethod

__all__ = ["EGPMethod", "layer_entropy", "layer_magnitudes"]


def layer_entropy(producers: Sequence[Sequence[str]], entropy: Sequence[float]) -> dict[str, float]:
    """Producer layer -> entropy of the site(s) it feeds (the largest, if several).

    Args:
        producers: per site, the layers that produce it.
        entropy: per site (same order), its layer entropy.

    Returns:
        Every producer layer once, with the largest entropy among the sites it feeds (as
        :meth:`egp_fast.EntropyStats.layer_entropy` gives for a whole measurement).

    Example:
        >>> layer_entropy([["fc1"], ["fc1", "fc2"]], [0.25, 0.75])
        {'fc1': 0.75, 'fc2': 0.75}
    """
    out: dict[str, float] = {}
    for layers, h in zip(producers, entropy):
        for p in layers:
            out[p] = max(out.get(p, 0.0), h)
    return out


def layer_magnitudes(view: Mapping[str, tuple[torch.Tensor, torch.Tensor]], remaining: Mapping[str, int]) -> dict[str, float]:
    """Layer -> mean ``|w|`` over its kept weights (0.0 for a layer with none left).

    Args:
        view: layer -> ``(weight, mask)``.
        remaining: layer -> unpruned weights.

    Example:
        >>> import torch
        >>> w = torch.tensor([[0.0, 2.0], [-4.0, 0.0]])
        >>> layer_magnitudes({"fc": (w, w != 0)}, {"fc": 2})
        {'fc': 3.0}
    """
    magnitude = {}
    for n, (w, _) in view.items():
        kept = remaining[n]
        # Pruned weights are exactly zero (masks are enforced), so the L1 norm of the whole
        # weight is the sum of |w| over the kept ones: no masked temporary needed.
        magnitude[n] = float(torch.linalg.vector_norm(w.detach(), 1)) / kept if kept else 0.0
    return magnitude


class EGPMethod(WeightMethod):
    """EGP: the budget goes to the producers of live sites, shared by entropy and magnitude.

    Prunes the layers that produce an activation site (not the head, nor a downsample conv
    that feeds a sum); a layer whose site is at zero entropy is already collapsible and gets
    nothing. Registered as ``method="egp"``.

    Example:
        >>> EGPMethod().name, EGPMethod().prunes_weights
        ('egp', True)
    """

    name = "egp"

    def __init__(self, **options: object) -> None:
        if set(options) - {"linearization"}:  # the Pruner passes linearization to every method
            raise ConfigError(f"method='egp' takes no options, got {sorted(set(options) - {'linearization'})}; "
                              "objective/target_speedup/fold/exact are options of method='easier'")

    def layers(self, model: nn.Module, graph: SiteGraph) -> list[str]:
        """The producer layers of the sites, in site order."""
        return graph.producer_layers()

    def plan(self, ctx: MethodContext, stats: EntropyStats, remaining: dict[str, int]) -> dict[str, int]:
        """Layer -> weights to prune: the round's budget shared by :func:`egp_fast.allocate`."""
        sites = list(stats.sites.values())
        layer_h = layer_entropy([s.producers for s in sites], [s.entropy for s in sites])
        names = list(ctx.layers)
        if names and not any(n in layer_h for n in names):
            raise ConfigError(
                "stats does not describe this model's prunable layers (no site produced by "
                f"{names[:3]}); measure with this pruner's measure()"
            )
        entropy = {n: layer_h.get(n, 0.0) for n in names}
        magnitude = layer_magnitudes(ctx.layers, remaining)
        return allocate(entropy, magnitude, remaining, round_budget(entropy, remaining, ctx.step))

    def plan_rule(self, ctx: MethodContext) -> PlanRule:
        """Layer -> weights :meth:`plan` would prune, before rounding down (the allocation's shares)."""
        remaining = ctx.remaining()
        magnitude = layer_magnitudes(ctx.layers, remaining)
        producers = [s.producers for s in ctx.graph.sites]
        names = list(ctx.layers)
        step = ctx.step

        def egp_plan(entropy: list[float], constant: list[bool]) -> dict[str, float]:
            layer_h = layer_entropy(producers, entropy)
            return round_shares({n: layer_h.get(n, 0.0) for n in names}, magnitude, remaining, step)

        return egp_plan
