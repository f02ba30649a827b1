"""EASIER: remove activation sites one at a time, guided by their entropy.

EASIER (Quétu, Liao, Tartaglione; ECML-PKDD 2024), the EGP authors' follow-up, does not wait for
pruning to make a layer affine: each iteration it measures the entropy of every activation
site, replaces the live site with the lowest entropy (and every site already at zero entropy)
by a linear map, fine-tunes, and evaluates; it keeps the last model whose validation accuracy is
within a tolerance of the dense one (docs/algorithm.md, "EASIER"). The replaced sites leave
affine layers behind that :func:`egp_fast.collapse` folds.

This module is the *method* (what an iteration measures, chooses and changes). The loop around
it (measure, choose, apply, fine-tune, evaluate, record, roll back) is the one of
:func:`egp_fast.prune`, shared with EGP and IMP: ``egp_fast.prune(model, data, method="easier",
evaluate=fn)`` runs it, ``egp_fast.Pruner(model, x, method="easier")`` steps through it.
:func:`choose_sites` and :meth:`EasierMethod.plan_rule` choose through the same
:func:`pick_sites`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch.nn as nn

from egp_fast.errors import ConfigError
from egp_fast.folding import linearize_sites, unremovable_sites
from egp_fast.graph import SiteGraph
from egp_fast.measurement import EntropyStats
from egp_fast.pruning.checks import check_linearization
from egp_fast.pruning.methods.base import MethodContext, PlanRule, PruningMethod
from egp_fast.pruning.records import RoundRecord

__all__ = ["EasierMethod", "choose_sites", "pick_sites"]


def pick_sites(names: Sequence[str], entropy: Sequence[float], constant: Sequence[bool]) -> list[str]:
    """EASIER's choice among candidate sites: every constant one and the lowest-entropy live one.

    Args:
        names: candidate sites, in execution order.
        entropy: per site (same order), its layer entropy.
        constant: per site, whether it is at zero entropy (every channel constant).

    Returns:
        The chosen sites in the order of ``names``; ties on the lowest entropy go to the first.

    Example:
        >>> pick_sites(["a", "b", "c", "d"], [0.0, 0.7, 0.4, 0.4], [True, False, False, False])
        ['a', 'c']
    """
    chosen = {n for n, c in zip(names, constant) if c}
    best = None
    for i, c in enumerate(constant):
        # Strictly lower only: ties go to the earlier site in execution order.
        if not c and (best is None or entropy[i] < entropy[best]):
            best = i
    if best is not None:
        chosen.add(names[best])
    return [n for n in names if n in chosen]


def choose_sites(stats: Any, exclude: Iterable[str] = ()) -> list[str]:
    """The sites one EASIER iteration removes, in execution order.

    Every site already at zero entropy (all channels constant on the data), plus the live site
    with the lowest layer entropy among the others (ties: the first in execution order).

    Args:
        stats: :class:`egp_fast.EntropyStats` of the current model (its sites are the live ones).
        exclude: sites not to choose (e.g. those that cannot be replaced in place).

    Returns:
        Site names; empty when ``stats`` has no site.

    Raises:
        ConfigError: ``stats`` is not an :class:`~egp_fast.EntropyStats`.

    Example:
        >>> import torch, egp_fast
        >>> from egp_fast.pruning import choose_sites
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8),
        ...                           torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> net[0].bias.data += 100.0  # site "1" is always ON: zero entropy
        >>> stats = egp_fast.measure_entropy(net, [torch.randn(64, 4)], progress=False)
        >>> choose_sites(stats)
        ['1', '3']
    """
    sites = getattr(stats, "sites", None)
    if not isinstance(sites, dict):
        raise ConfigError(f"stats must be the EntropyStats of measure(), got {type(stats).__name__}")
    skip = set(exclude)
    names = [n for n in sites if n not in skip]
    return pick_sites(names, [sites[n].entropy for n in names], [sites[n].collapsible for n in names])


class EasierMethod(PruningMethod):
    """The EASIER method as a :class:`~egp_fast.Pruner` strategy: a round removes sites.

    ``plan(stats)`` returns ``{site: 1}`` for the sites :func:`choose_sites` picks; ``apply``
    replaces them in place: sites at zero entropy by their exact map on the data
    (``how="data"``), the others by ``linearization``. No weight is pruned. Registered as
    ``method="easier"``; :func:`egp_fast.prune` needs ``evaluate=`` for it and keeps the best
    model within ``max_drop`` (default 0.01) of the dense accuracy.

    A site that cannot be replaced in place (a functional activation in the root module's own
    ``forward``, unless the model is an ``fx.GraphModule``: pass ``egp_fast.trace(model)``) is
    never chosen; a warning names it once, with the reason, and :attr:`skipped` lists it.

    Args:
        linearization: ``"identity"`` or ``"majority"``.

    Raises:
        ConfigError: unknown ``linearization``.

    Example:
        >>> EasierMethod("majority").linearization
        'majority'
    """

    name = "easier"
    prunes_weights = False
    default_max_drop = 0.01

    def __init__(self, linearization: str = "identity", **options: object) -> None:
        self.linearization = check_linearization(linearization)
        self.skipped: dict[str, str] = {}

    def layers(self, model: nn.Module, graph: SiteGraph) -> list[str]:
        """EASIER prunes no weight layer: no masks are attached."""
        return []

    def plan(self, ctx: MethodContext, stats: EntropyStats, remaining: dict[str, int]) -> dict[str, int]:
        """Site -> 1 for the sites :func:`choose_sites` picks among those replaceable in place."""
        blocked = unremovable_sites(ctx.model, list(stats.sites))
        for name, why in blocked.items():
            if name not in self.skipped:
                warnings.warn(f"method='easier' skips site {name}: {why}", stacklevel=3)
            self.skipped[name] = why
        return {n: 1 for n in choose_sites(stats, exclude=blocked)}

    def plan_rule(self, ctx: MethodContext) -> PlanRule:
        """Site -> 1.0 for the sites :meth:`plan` would remove, 0.0 for the other replaceable ones."""
        names = [s.name for s in ctx.graph.sites]
        blocked = unremovable_sites(ctx.model, names)
        live = [i for i, n in enumerate(names) if n not in blocked]
        live_names = [names[i] for i in live]

        def easier_plan(entropy: list[float], constant: list[bool]) -> dict[str, float]:
            chosen = set(pick_sites(live_names, [entropy[i] for i in live], [constant[i] for i in live]))
            return {n: 1.0 if n in chosen else 0.0 for n in live_names}

        return easier_plan

    def apply(self, ctx: MethodContext, plan: dict[str, int], stats: EntropyStats | None) -> list[str]:
        """Linearise the planned sites; returns their names in execution order."""
        if stats is None:
            raise ConfigError(
                "method='easier': apply(plan) needs the EntropyStats the plan came from; call "
                "plan(stats) first or pass apply(plan, stats=stats)"
            )
        known = stats.sites
        unknown = [n for n in plan if n not in known]
        if unknown:
            raise ConfigError(
                f"plan names sites the model does not have (live sites: {', '.join(known) or 'none'}): "
                f"{unknown[:5]}; method='easier' plans are {{site_name: 1}}"
            )
        bad = {n: v for n, v in plan.items() if isinstance(v, bool) or v not in (0, 1)}
        if bad:
            raise ConfigError(f"method='easier' plan values must be 1 (remove) or 0 (keep), got {bad}")
        names = [n for n in known if plan.get(n, 0)]
        if not names:
            return []
        how = {n: "data" if known[n].collapsible else self.linearization for n in names}
        done, refused = linearize_sites(ctx.model, stats, names, how)
        if refused:
            reasons = "; ".join(f"{n}: {why}" for n, why in refused)
            raise ConfigError(f"method='easier' could not remove site(s) {reasons}")
        return done

    def progressed(self, record: RoundRecord) -> bool:
        """A round made progress when it removed a site."""
        return bool(record.removed_sites)
