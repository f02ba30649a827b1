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

``objective="latency"`` ranks removals by the speed they unlock instead (docs/algorithm.md,
"EASIER"): candidates are the removal groups of :func:`egp_fast.folding.removal_groups` (the
live sites whose joint removal lets collapse merge layers: both activations of an inverted
residual, a transformer MLP's activation, the inner pair of a bottleneck), each scored by its
entropy cost per unit of predicted cost saved; :func:`pick_group` makes that choice.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn

from egp_fast.errors import ConfigError
from egp_fast.folding import (
    LatencyCost,
    RemovalGroup,
    collapse,
    compare_latency,
    flops_cost,
    layer_chains,
    linearize_sites,
    predicted_speedup,
    removal_groups,
    unremovable_sites,
)
from egp_fast.graph import SiteGraph, normalize_inputs
from egp_fast.measurement import EntropyStats
from egp_fast.pruning.checks import check_linearization
from egp_fast.pruning.methods.base import MethodContext, PlanRule, PruningMethod
from egp_fast.pruning.records import RoundRecord

__all__ = ["OBJECTIVES", "EasierMethod", "check_objective", "choose_sites", "pick_group", "pick_sites"]

#: What EASIER's removal order optimises: the sites (EASIER's rule) or the time they unlock.
OBJECTIVES = ("sites", "latency")


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


def pick_group(
    names: Sequence[str], entropy: Sequence[float], constant: Sequence[bool], groups: Iterable[RemovalGroup]
) -> tuple[list[str], RemovalGroup | None]:
    """``objective="latency"``'s choice: every constant site and the group of least entropy per saving.

    A group's entropy cost is the *sum* of its live sites' entropies (a constant site costs
    nothing: it is removed anyway, so a group of constant sites alone is no candidate). The
    sum, not the maximum: the group's sites are all linearised in one step, and each carries
    its own information, so a group of two costs about what two single removals would; the
    maximum would make large groups look as cheap as their costliest site. The score is that
    cost over the group's predicted saving; only groups that save something compete. When none
    does, the choice falls back to :func:`pick_sites` (the lowest-entropy live site), and no
    group is returned.

    Args:
        names: candidate sites, in execution order.
        entropy: per site (same order), its layer entropy.
        constant: per site, whether it is at zero entropy.
        groups: removal groups (:func:`egp_fast.folding.removal_groups`); a group naming a site
            outside ``names`` is not a candidate.

    Returns:
        ``(sites, group)``: the chosen sites in the order of ``names`` and the group chosen
        (``None`` when the choice fell back to the lowest-entropy site). Ties on the score go
        to the group starting first in execution order, then to the smaller group.

    Example:
        >>> from egp_fast.folding import RemovalGroup
        >>> groups = [RemovalGroup(["a"], [], 0.0, "flops"), RemovalGroup(["b", "c"], [], 10.0, "flops")]
        >>> pick_group(["a", "b", "c"], [0.1, 0.5, 0.5], [False, False, False], groups)[0]
        ['b', 'c']
    """
    index = {n: i for i, n in enumerate(names)}
    best, best_key = None, None
    for g in groups:
        if g.saving <= 0 or not g.sites or any(s not in index for s in g.sites):
            continue
        if all(constant[index[s]] for s in g.sites):
            continue  # constant sites go anyway; a candidate must remove a live one
        cost = sum(0.0 if constant[index[s]] else float(entropy[index[s]]) for s in g.sites)
        key = (cost / g.saving, min(index[s] for s in g.sites), len(g.sites))
        if best_key is None or key < best_key:
            best, best_key = g, key
    if best is None:
        return pick_sites(names, entropy, constant), None
    chosen = {n for n, c in zip(names, constant) if c} | set(best.sites)
    return [n for n in names if n in chosen], best


def check_objective(objective: str, target_speedup: float | None, fold: str = "auto") -> float | None:
    """Validate EASIER's ``objective``, ``target_speedup`` and ``fold``; returns ``target_speedup``.

    Raises:
        ConfigError: the message names the argument and the fix.

    Example:
        >>> check_objective("latency", 1.5)
        1.5
    """
    if objective not in OBJECTIVES:
        raise ConfigError(
            f"objective={objective!r}; use 'sites' (remove the lowest-entropy site each step, EASIER's "
            "rule) or 'latency' (remove the group of sites with the least entropy per unit of predicted "
            "time saved)"
        )
    if objective == "latency" and fold not in ("auto", "latency"):
        raise ConfigError(
            f"objective='latency' predicts savings with the fold plan, which fold={fold!r} does not make; "
            "use fold='auto' (FLOPs) or fold='latency' (layer times measured on the model's device)"
        )
    if target_speedup is None:
        return None
    if objective != "latency":
        raise ConfigError(
            f"target_speedup={target_speedup!r} needs objective='latency' (the speed-up is predicted "
            "from the groups of sites it removes); pass objective='latency' or drop target_speedup"
        )
    if isinstance(target_speedup, bool) or not isinstance(target_speedup, (int, float)) or not (
        math.isfinite(target_speedup) and target_speedup > 1.0
    ):
        raise ConfigError(
            f"target_speedup={target_speedup!r} must be a finite number > 1.0: the predicted speed-up of "
            "the collapsed model at which to stop (1.5 = 1.5x faster); None removes until max_drop stops"
        )
    return float(target_speedup)


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

    ``plan(stats)`` returns ``{site: 1}`` for the sites it picks; ``apply`` replaces them in
    place: sites at zero entropy by their exact map on the data (``how="data"``), the others by
    ``linearization``. No weight is pruned. Registered as ``method="easier"``;
    :func:`egp_fast.prune` needs ``evaluate=`` for it and keeps the best model within
    ``max_drop`` (default 0.01) of the dense accuracy.

    What a round picks, besides every site already at zero entropy, depends on ``objective``:

    * ``"sites"`` (EASIER's rule, :func:`choose_sites`): the live site of lowest entropy;
    * ``"latency"``: the removal group (:func:`egp_fast.folding.removal_groups`) of least
      entropy per unit of cost saved (:func:`pick_group`), the cost being the fold plan's
      (``fold="auto"``: FLOPs; ``fold="latency"``: each candidate layer timed on the model's
      device; or ``cost``); the lowest-entropy site when no group saves anything. :attr:`last`
      then holds the round's group and predicted speed-up, and :meth:`annotate` writes them
      (and a measured speed-up) into the round's record.

    A site that cannot be replaced in place (a functional activation in the root module's own
    ``forward``, unless the model is an ``fx.GraphModule``: pass ``egp_fast.trace(model)``) is
    never chosen; a warning names it once, with the reason, and :attr:`skipped` lists it.

    Args:
        linearization: ``"identity"`` or ``"majority"``.
        objective: ``"sites"`` or ``"latency"``.
        target_speedup: ``objective="latency"``: the predicted speed-up of the collapsed model
            at which :func:`egp_fast.prune` stops (> 1.0; ``None``: no such stop).
        fold: how the collapsed model will be folded (``collapse(fold=...)``): ``"auto"`` or
            ``"latency"`` price the savings of ``objective="latency"``.
        exact: as ``collapse(exact=...)``: True counts only merges that keep every output (on
            CNNs with zero-padded convs, most merges need ``exact=False``).
        cost: a callable pricing a :class:`~egp_fast.folding.LayerSpec`, instead of ``fold``'s.

    Raises:
        ConfigError: an unknown ``linearization`` or ``objective``, or a ``target_speedup``
            that is not > 1.0 or comes without ``objective="latency"``.

    Example:
        >>> EasierMethod("majority").linearization
        'majority'
        >>> EasierMethod(objective="latency", target_speedup=1.5).target_speedup
        1.5
    """

    name = "easier"
    prunes_weights = False
    default_max_drop = 0.01

    def __init__(
        self,
        linearization: str = "identity",
        objective: str = "sites",
        target_speedup: float | None = None,
        fold: str = "auto",
        exact: bool = True,
        cost: Callable[[Any], float] | None = None,
        **options: object,
    ) -> None:
        self.linearization = check_linearization(linearization)
        self.target_speedup = check_objective(objective, target_speedup, fold)
        if cost is not None and not callable(cost):
            raise ConfigError(f"cost must be a callable LayerSpec -> float or None, got {type(cost).__name__}")
        self.objective = objective
        self.fold = fold
        self.exact = bool(exact)
        self.cost = cost
        self.skipped: dict[str, str] = {}
        #: ``objective="latency"``: what the last :meth:`plan` chose (``group``, ``saving``,
        #: ``entropy_cost``, ``metric``, ``predicted_speedup``); ``None`` before the first plan.
        self.last: dict[str, Any] | None = None

    def layers(self, model: nn.Module, graph: SiteGraph) -> list[str]:
        """EASIER prunes no weight layer: no masks are attached."""
        return []

    def _blocked(self, ctx: MethodContext, names: list[str]) -> dict[str, str]:
        blocked = unremovable_sites(ctx.model, names)
        for name, why in blocked.items():
            if name not in self.skipped:
                warnings.warn(f"method='easier' skips site {name}: {why}", stacklevel=4)
            self.skipped[name] = why
        return blocked

    def layer_cost(self, model: nn.Module) -> Callable[[Any], float]:
        """What a merged layer costs for ``objective="latency"``: ``cost``, FLOPs or a cached LatencyCost."""
        if self.cost is None:
            if self.fold != "latency":
                self.cost = flops_cost
            else:
                p = next(model.parameters(), None)
                self.cost = LatencyCost(p.device if p is not None else None, p.dtype if p is not None else None)
        return self.cost

    def plan(self, ctx: MethodContext, stats: EntropyStats, remaining: dict[str, int]) -> dict[str, int]:
        """Site -> 1 for the sites this round removes (see the class docstring), among the replaceable ones."""
        blocked = self._blocked(ctx, list(stats.sites))
        if self.objective == "sites":
            return {n: 1 for n in choose_sites(stats, exclude=blocked)}
        cost = self.layer_cost(ctx.model)
        chains = layer_chains(ctx.graph)
        groups = removal_groups(chains, cost, exact=self.exact)
        names = [n for n in stats.sites if n not in blocked]
        sites = stats.sites
        chosen, group = pick_group(names, [sites[n].entropy for n in names], [sites[n].collapsible for n in names],
                                   groups)
        live = [n for n in chosen if not sites[n].collapsible]
        self.last = {
            "group": list(group.sites) if group is not None else live,
            "saving": group.saving if group is not None else 0.0,
            "entropy_cost": sum(sites[n].entropy for n in live),
            "metric": getattr(cost, "metric", "cost"),
            "predicted_speedup": predicted_speedup(ctx.graph, cost, exact=self.exact, removed=chosen,
                                                   chains=chains)["speedup"],
        }
        return {n: 1 for n in chosen}

    def plan_rule(self, ctx: MethodContext) -> PlanRule:
        """Site -> 1.0 for the sites :meth:`plan` would remove, 0.0 for the other replaceable ones."""
        names = [s.name for s in ctx.graph.sites]
        blocked = unremovable_sites(ctx.model, names)
        live = [i for i, n in enumerate(names) if n not in blocked]
        live_names = [names[i] for i in live]
        groups = None
        if self.objective == "latency":
            groups = removal_groups(layer_chains(ctx.graph), self.layer_cost(ctx.model), exact=self.exact)

        def easier_plan(entropy: list[float], constant: list[bool]) -> dict[str, float]:
            h, c = [entropy[i] for i in live], [constant[i] for i in live]
            picked = pick_sites(live_names, h, c) if groups is None else pick_group(live_names, h, c, groups)[0]
            chosen = set(picked)
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

    def measure_speedup(self, model: nn.Module, example_inputs: Any, *, budget_s: float = 0.5) -> float | None:
        """Speed-up of ``model`` collapsed (as ``fold``/``exact`` say) over ``model`` as it is.

        The sites already linearised are folded (nothing else is removed), and the two models are
        timed interleaved on ``example_inputs``' batch size (:func:`egp_fast.folding.compare_latency`, a few
        rounds within ``budget_s``). Returns the median of the paired time ratios (above 1: the
        collapsed model is faster), or ``None`` with a warning when the model cannot be collapsed
        or timed.
        """
        try:
            empty = EntropyStats(sites={}, mode="exact", batches=0)
            out = collapse(model, empty, example_inputs, exact=self.exact, fold=self.fold, measure_latency=False,
                           sites=[], cost=self.layer_cost(model))
            args, kwargs = normalize_inputs(example_inputs)
            first = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim()), None)
            batch = int(first.shape[0]) if first is not None and first.shape[0] > 0 else 1
            timing = compare_latency(model, out.model, example_inputs, batch_sizes=(batch,), budget_s=budget_s,
                                     min_rounds=3, max_rounds=9)
            return float(timing["batches"][batch]["speedup"])
        except Exception as e:  # the measurement informs; it must not stop the pruning
            warnings.warn(f"method='easier': could not measure the collapsed model's speed-up: "
                          f"{type(e).__name__}: {str(e)[:200]}", stacklevel=2)
            return None

    def annotate(self, record: RoundRecord, model: nn.Module | None = None, example_inputs: Any = None) -> None:
        """Write the round's removal group and speed-ups into ``record`` (``objective="latency"``).

        Args:
            record: the record of the round whose :meth:`plan` ran last.
            model: the model after the round; with ``example_inputs``, the collapsed model's
                speed-up is measured (:meth:`measure_speedup`) into ``record.measured_speedup``.
            example_inputs: a batch the model accepts.
        """
        if self.objective != "latency" or self.last is None:
            return
        record.group = list(self.last["group"])
        record.predicted_speedup = float(self.last["predicted_speedup"])
        if model is not None and example_inputs is not None and record.removed_sites:
            record.measured_speedup = self.measure_speedup(model, example_inputs)
