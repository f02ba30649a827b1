"""What a pruning method is: the :class:`PruningMethod` protocol and the :class:`MethodContext` it sees.

A method says what one round of the loop changes (docs/algorithm.md, "One pruning round"):
which layers get masks, whether its plan reads the measured entropies, the plan itself, the
same plan as a rule on bare per-site entropies (what ``stop="decided"`` waits for), how a plan
is carried out, and whether a round made progress. :class:`WeightMethod` is the shared half of
the methods that prune weights (EGP, IMP): a plan is ``{layer: weights to prune}``, carried
out smallest ``|w|`` first, and masks hold the pruned weights at zero.

A method sees the model only through a :class:`MethodContext` (built by
:class:`egp_fast.Pruner` for each call) and explicit arguments, never the Pruner itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from egp_fast import ops
from egp_fast.errors import ConfigError
from egp_fast.graph import SiteGraph
from egp_fast.masks import PackedMask, set_masks
from egp_fast.measurement import EntropyStats
from egp_fast.ops import backend_for
from egp_fast.pruning.records import RoundRecord

__all__ = ["MethodContext", "PlanRule", "PruningMethod", "WeightMethod"]

#: ``rule(entropy, constant) -> {key: amount}``: a plan computed from one entropy and one
#: zero-entropy flag per site, in the order of the context's ``graph.sites``.
PlanRule = Callable[[list[float], list[bool]], dict[str, float]]


@dataclass(frozen=True)
class MethodContext:
    """What a method sees of the model it prunes (the Pruner builds one for each call).

    Attributes:
        model: the network (unwrapped), changed in place by :meth:`PruningMethod.apply`.
        graph: its activation sites, as traced now.
        layers: prunable layer -> ``(weight, mask)``, in site order (empty for a method that
            prunes no weights).
        step: fraction of the remaining weights a round prunes.
        backend: compute backend for the ops (``None``: automatic).

    Example:
        >>> import torch, egp_fast
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> graph = egp_fast.discover_sites(net, torch.randn(2, 4))
        >>> w = net[0].weight
        >>> ctx = MethodContext(net, graph, {"0": (w, torch.ones_like(w, dtype=torch.bool))}, 0.5, None)
        >>> ctx.remaining()
        {'0': 32}
    """

    model: nn.Module
    graph: SiteGraph
    layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    step: float
    backend: str | None

    def remaining(self) -> dict[str, int]:
        """Unpruned weights per prunable layer (one reduction per layer)."""
        return {n: int(torch.count_nonzero(m)) for n, (_, m) in self.layers.items()}


class PruningMethod(ABC):
    """One pruning method, as the loop of :func:`egp_fast.prune` and :class:`egp_fast.Pruner` use it.

    Register a factory for it with :func:`egp_fast.pruning.register_method` to make it a
    ``method=`` of ``prune()`` and ``Pruner``.

    Attributes:
        name: the name it is registered under (recorded in each :class:`RoundRecord`).
        prunes_weights: a plan prunes weights of :meth:`layers` (masks hold them at zero);
            ``False``: the method changes the model otherwise (EASIER removes sites), gets no
            masks, and ``layers=`` / ``linearize=`` do not apply.
        needs_entropy: what it needs measured: ``True`` when its plan reads the measured
            entropies, so ``measure(stop="decided")`` also waits for :meth:`plan_rule`'s
            plan; ``False`` (IMP) when it reads the weights alone.
        default_max_drop: the accuracy tolerance :func:`egp_fast.prune` uses when the caller
            gives none; a number makes ``evaluate=`` required (EASIER: 0.01).
    """

    name: str = ""
    prunes_weights: bool = True
    needs_entropy: bool = True
    default_max_drop: float | None = None

    @abstractmethod
    def layers(self, model: nn.Module, graph: SiteGraph) -> list[str]:
        """The layers that get masks (Conv/Linear names of ``model``); ``[]`` for none."""

    @abstractmethod
    def plan(self, ctx: MethodContext, stats: EntropyStats, remaining: dict[str, int]) -> dict[str, int]:
        """What this round changes, from ``stats`` and the unpruned weights per layer."""

    def plan_rule(self, ctx: MethodContext) -> PlanRule | None:
        """:meth:`plan` as a rule on bare per-site entropies, for the model as it is now.

        The amounts may be the plan before rounding (the jackknife of ``stop="decided"``
        judges them; see docs/algorithm.md, "How sure is \"zero entropy\"?"). ``None`` (the
        default): the measurement waits for the entropies alone.
        """
        return None

    @abstractmethod
    def apply(self, ctx: MethodContext, plan: dict[str, int], stats: EntropyStats | None) -> list[str]:
        """Carry out ``plan``; returns the sites removed (in execution order)."""

    @abstractmethod
    def progressed(self, record: RoundRecord) -> bool:
        """Whether the round of ``record`` changed anything (else the loop stops)."""


class WeightMethod(PruningMethod):
    """Shared by EGP and IMP: a round prunes a budget of weights; masks hold them at zero.

    A subclass gives :meth:`layers` and :meth:`plan` (``{layer: weights to prune}``);
    :meth:`apply` prunes the smallest ``|w|`` of each layer and :meth:`progressed` asks
    whether any weight went.
    """

    prunes_weights = True

    def apply(self, ctx: MethodContext, plan: dict[str, int], stats: EntropyStats | None) -> list[str]:
        """Prune ``plan[layer]`` more weights of each layer, smallest ``|w|`` first; removes no site."""
        view = ctx.layers
        unknown = [n for n in plan if n not in view]
        if unknown:
            raise ConfigError(
                f"plan names layers this pruner does not prune: {unknown[:5]}; prunable layers "
                f"are {list(view)[:5]}{'...' if len(view) > 5 else ''}"
            )
        names = [n for n in view if plan.get(n, 0)]
        if not names:
            return []
        backend = backend_for("select_smallest", ctx.backend)
        groups = _groups(names, [view[n][1].numel() for n in names])
        if len(groups) == 1:
            new = ops.select_smallest(
                [view[n][0] for n in names], [view[n][1] for n in names], [int(plan[n]) for n in names],
                backend=backend,
            )
            set_masks(ctx.model, dict(zip(names, new)))
            return []
        # A big model: select a group of layers at a time and hold the new masks packed (1 bit
        # per weight) until every layer is selected; set_masks then writes them layer by layer.
        # The round's peak stays about a group's bool masks and selection scratch (issue 21).
        # The bits of every layer live in one buffer, allocated first: interleaved with the
        # groups' short-lived masks, many small blocks would fragment the heap (on glibc, tens
        # of MB of freed but resident memory in a 100M-weight round).
        store = _bit_store([view[n][1] for n in names])
        packed: dict[str, PackedMask] = {}
        for group in groups:
            new = ops.select_smallest(
                [view[n][0] for n in group], [view[n][1] for n in group], [int(plan[n]) for n in group],
                backend=backend,
            )
            for n in group:
                packed[n] = PackedMask(new.pop(0), out=next(store))
        set_masks(ctx.model, packed, take=True)  # frees each packed mask once written
        return []

    def progressed(self, record: RoundRecord) -> bool:
        """A round made progress when it pruned a weight."""
        return record.pruned > 0


#: Layers are selected in groups of about this many weights (a layer bigger than it alone):
#: a group's new bool masks and scratch are what a round holds at most.
GROUP_WEIGHTS = 1 << 23


def _groups(names: list[str], sizes: list[int]) -> list[list[str]]:
    """``names`` cut, in order, into runs of at most :data:`GROUP_WEIGHTS` weights (or one layer)."""
    out: list[list[str]] = []
    total = GROUP_WEIGHTS + 1
    for n, size in zip(names, sizes):
        if total + size > GROUP_WEIGHTS:
            out.append([])
            total = 0
        out[-1].append(n)
        total += size
    return out


def _bit_store(masks: list[torch.Tensor]) -> Iterator[torch.Tensor | None]:
    """Per mask in order, a slice of one uint8 buffer that holds its packed bits (``None``, a new
    buffer, where the masks are not all on one device)."""
    sizes = [(m.numel() + 7) // 8 for m in masks]
    if len({m.device for m in masks}) != 1:
        yield from (None for _ in masks)
        return
    buf = torch.empty(sum(sizes), dtype=torch.uint8, device=masks[0].device)
    at = 0
    for size in sizes:
        yield buf[at : at + size]
        at += size


def check_method(method: Any) -> PruningMethod:
    """``method`` if it is a :class:`PruningMethod`, else a :class:`ConfigError` naming what it is."""
    if not isinstance(method, PruningMethod):
        raise ConfigError(
            f"a method factory must return a PruningMethod (egp_fast.pruning.PruningMethod), got "
            f"{type(method).__name__}"
        )
    return method
