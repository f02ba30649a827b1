"""The pruning loop, once, for every method: EGP, the IMP baseline and EASIER.

A *method* is a small strategy that says what a round changes: EGP and IMP prune a budget of
weights (:mod:`egp_fast.prune_methods`), EASIER linearises activation sites
(:class:`egp_fast.pruning.EasierMethod`); the records and the snapshot that rolls a round back
are in :mod:`egp_fast.prune_records`. Around it the loop exists once: measure, plan, apply,
fine-tune, evaluate, record, roll back. :class:`Pruner` runs one step at a time
(``measure`` -> ``plan`` -> ``apply``, or ``round``) for users who own their training loop (and
for the ``egp-fast`` command); :func:`prune` runs whole rounds with fine-tune and evaluation
callbacks, keeps each completed round when a later one fails, and for EASIER returns the best
model within the accuracy tolerance.
"""

from __future__ import annotations

import contextlib
import inspect as _inspect
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

from egp_fast import masks as _masks
from egp_fast.pruning.budget import round_shares
from egp_fast.pruning.easier import (
    EasierMethod,
    check_accuracy,
    check_linearization,
    check_max_drop,
    within_tolerance,
)
from egp_fast.errors import ConfigError, DataError, ModelError, PruneInterrupted
from egp_fast.graph import SiteGraph, unwrap_model, discover_sites, weight_layers
from egp_fast.pruning.methods import _EGPMethod, _IMPMethod, _make_method, _WeightMethod, layer_magnitudes
from egp_fast.pruning.records import ModelSnapshot, PruneResult, RoundRecord, _Snapshot
from egp_fast.measurement import EntropyStats, measure_entropy, split_batch
from egp_fast.measurement.decide import check_plan

METHODS = ("egp", "imp", "easier")

__all__ = ["METHODS", "ModelSnapshot", "PruneResult", "Pruner", "RoundRecord", "prune"]
# Re-exported for code that reaches them here (tests patch the method classes).
_REEXPORTED = (EasierMethod, _EGPMethod, _IMPMethod, _WeightMethod, _Snapshot)


# --------------------------------------------------------------------------------------------
# Pruner.


def _check_step(step: Any) -> float:
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step < 1:
        raise ConfigError(
            f"step={step!r} must be a number strictly between 0 and 1 (the fraction of the "
            "remaining weights pruned per round; the paper uses 0.5)"
        )
    return float(step)


def _check_method(method: Any) -> str:
    if method not in METHODS:
        raise ConfigError(
            f"method={method!r} is not a pruning method; use 'egp' or 'imp' (weight pruning) or "
            "'easier' (activation removal)"
        )
    return method


# Options of measure_entropy that Pruner.measure passes through when this install's
# measure_entropy has them (early stopping: stop/max_flip/confidence/tol).


def _measure_supports() -> set[str]:
    return set(_inspect.signature(measure_entropy).parameters)


def _empty_stats(mode: str) -> EntropyStats:
    return EntropyStats(sites={}, mode=mode, batches=0)


class Pruner:
    """Step-wise pruning of one model: EGP, IMP or EASIER.

    What a step means depends on the method:

    * ``egp`` / ``imp``: :meth:`plan` returns ``{layer: weights to prune}``; :meth:`apply`
      prunes them (smallest ``|w|`` first) and masks keep them at zero through fine-tuning.
    * ``easier``: :meth:`plan` returns ``{site: 1}`` for the sites to remove this iteration
      (every site at zero entropy, plus the live site with the lowest entropy, ties to the
      first in execution order); :meth:`apply` replaces them in place by affine maps (the
      zero-entropy ones by their exact map on the data, the others by ``linearization``).
      No weight is pruned and no mask is attached.

    :meth:`round` does one measure-plan-apply step and returns its :class:`RoundRecord`;
    fine-tuning and evaluation stay with the caller (:func:`prune` adds them).

    Args:
        model: the network to prune, in place (a DDP/DataParallel wrapper is unwrapped).
        example_inputs: a batch the model accepts, for tracing; default: the inputs of the
            first batch that :meth:`measure` sees.
        step: fraction of the eligible layers' remaining weights pruned per round, in (0, 1)
            (``egp``/``imp``; unused by ``easier``).
        method: ``"egp"`` (entropy-guided, prunes the producers of activation sites),
            ``"imp"`` (one global magnitude threshold over every Conv/Linear layer) or
            ``"easier"`` (removes the lowest-entropy activation site each round).
        layers: prune these layers instead of the method's default set (not with ``easier``).
        linearize: ``egp``/``imp``: replace zero-entropy sites by their affine equivalent at
            each round, so fine-tuning trains the shallower model (the prune-collapse loop).
        backend: force a compute backend for the ops (``None``: automatic).
        entropy_mode: ``"exact"`` or ``"paper"`` (see :func:`measure_entropy`).
        progress: show progress bars.
        masked_linear: swap each pruned ``nn.Linear`` for :class:`egp_fast.modules.MaskedLinear`
            (same Parameters), whose forward skips all-zero weight tiles on a GPU.
        linearization: ``easier`` only: ``"identity"`` (the site becomes ``y = z``, as in the
            EASIER paper) or ``"majority"`` (per channel: identity where ``p_on >= 0.5``, zero
            otherwise; the dead channels then prune away in collapse).

    Raises:
        ConfigError: a bad argument (the message names it).

    Example:
        >>> import torch, egp_fast
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> x = torch.randn(64, 4)
        >>> pruner = egp_fast.Pruner(net, x, progress=False)
        >>> stats = pruner.measure([x])
        >>> pruner.apply(pruner.plan(stats))  # egp/imp remove no site
        []
        >>> pruner.sparsity()
        0.5
        >>> easier = egp_fast.Pruner(net, x, method="easier", progress=False)
        >>> easier.plan(easier.measure([x]))
        {'1': 1}
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any = None,
        *,
        step: float = 0.5,
        method: str = "egp",
        layers: Iterable[str] | None = None,
        linearize: bool = False,
        backend: str | None = None,
        entropy_mode: str = "exact",
        progress: bool = True,
        masked_linear: bool = False,
        linearization: str = "identity",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = unwrap_model(model)
        self.step = _check_step(step)
        self.method = _check_method(method)
        self.linearization = check_linearization(linearization)
        self._method = _make_method(self.method, self.linearization)
        if entropy_mode not in ("exact", "paper"):
            raise ConfigError(f"entropy_mode={entropy_mode!r}; use 'exact' or 'paper'")
        self.entropy_mode = entropy_mode
        self.linearize = bool(linearize)
        self.backend = backend
        self.progress = progress
        self.masked_linear = bool(masked_linear)
        self.example_inputs = example_inputs
        self._layers = list(layers) if layers is not None else None
        self._graph: SiteGraph | None = None
        self._planned: EntropyStats | None = None
        self.iteration = 0
        if self._layers is not None:
            if not self._method.prunes_weights:
                raise ConfigError(
                    f"layers= chooses weight layers to prune; method={self.method!r} prunes no "
                    "weights (it removes activation sites): drop layers="
                )
            known = set(weight_layers(self.model))
            bad = [n for n in self._layers if n not in known]
            if bad:
                raise ConfigError(
                    f"layers={bad} are not Conv/Linear layers of the model; pick from "
                    f"{sorted(known)[:10]}{'...' if len(known) > 10 else ''}"
                )
        if example_inputs is not None:
            self._ensure_graph(example_inputs)

    # -- structure -----------------------------------------------------------------------

    def _ensure_graph(self, example_inputs: Any) -> SiteGraph:
        if self._graph is None:
            if example_inputs is None:
                raise DataError("no example_inputs yet: call measure(data) first or pass example_inputs")
            self.example_inputs = example_inputs
            self._graph = discover_sites(self.model, example_inputs)
            _masks.attach_masks(self.model, self._default_layers())
            if self.masked_linear and self._swap_masked_linear():
                self._graph = discover_sites(self.model, example_inputs)  # new module objects
        return self._graph

    def _retrace(self) -> None:
        """Discover the sites again after the model's structure changed."""
        self._graph = None
        try:
            self._ensure_graph(self.example_inputs)
        except ModelError:
            # discover_sites found no activation: every site has been removed (EASIER's last
            # iteration, or linearize=True took the last one). Nothing is left to measure.
            self._graph = SiteGraph([], None, [])

    def _swap_masked_linear(self) -> bool:
        from egp_fast.masks.linear import MaskedLinear

        swapped = False
        for name in self._default_layers():
            layer = self.model.get_submodule(name)
            if type(layer) is not nn.Linear:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            new = MaskedLinear.from_linear(layer, backend=self.backend)
            setattr(parent, child, new)
            _masks.rebind(new)
            swapped = True
        return swapped

    def _default_layers(self) -> list[str]:
        if self._layers is not None:
            return list(self._layers)
        return self._method.layers(self)

    @property
    def graph(self) -> SiteGraph:
        """The sites of the model (traced on the example inputs)."""
        return self._ensure_graph(self.example_inputs)

    @property
    def prunable(self) -> list[str]:
        """Names of the layers this pruner prunes, in site order (none for ``easier``)."""
        return list(self._modules())

    @property
    def sites_left(self) -> int:
        """Number of activation sites the model still has."""
        return len(self.graph)

    def _modules(self) -> dict[str, nn.Module]:
        # Walking named_modules() costs ~10 ms on resnet18: do it once per traced graph.
        graph = self._ensure_graph(self.example_inputs)
        cache = getattr(self, "_modules_cache", None)
        if cache is None or cache[0] is not graph:
            layers = _masks.masked_layers(self.model)
            cache = (graph, {n: layers[n] for n in self._default_layers() if n in layers})
            self._modules_cache = cache
        return cache[1]

    def sparsity(self) -> float:
        """Fraction of pruned weights over the prunable layers."""
        return self._sparsity(self._remaining())

    def _remaining(self) -> dict[str, int]:
        """Unpruned weights per prunable layer (one reduction per layer)."""
        return {n: int(torch.count_nonzero(m)) for n, (_, m) in self._layer_view().items()}

    def _sparsity(self, remaining: dict[str, int]) -> float:
        view = self._layer_view()
        total = sum(view[n][1].numel() for n in remaining)
        return 1.0 - sum(remaining.values()) / total if total else 0.0

    def _layer_view(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {n: (m.weight, getattr(m, _masks.MASK)) for n, m in self._modules().items()}

    # -- snapshots -------------------------------------------------------------------------

    def snapshot(self) -> ModelSnapshot:
        """Record the model now (structure, masks, weights, hooks, flags) for :meth:`restore`.

        Returns:
            A :class:`ModelSnapshot`; ``snapshot.take(pruner.model)`` refreshes it in place,
            reusing its CPU buffers.

        Example:
            >>> import torch, egp_fast
            >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8),
            ...                           torch.nn.ReLU(), torch.nn.Linear(8, 2))
            >>> x = torch.randn(32, 4)
            >>> pruner = egp_fast.Pruner(net, x, method="easier", progress=False)
            >>> best = pruner.snapshot()
            >>> removed = pruner.apply(pruner.plan(pruner.measure([x])))
            >>> pruner.sites_left
            1
            >>> pruner.restore(best)
            >>> pruner.sites_left
            2
        """
        return ModelSnapshot(self.model)

    def restore(self, snapshot: ModelSnapshot) -> None:
        """Return the model to ``snapshot`` (e.g. EASIER's best iteration) and re-trace it.

        Args:
            snapshot: a :class:`ModelSnapshot` of this pruner's model (see :meth:`snapshot`,
            which has an example).

        Raises:
            ConfigError: the snapshot is of another model.
        """
        if not isinstance(snapshot, ModelSnapshot) or snapshot.root is not self.model:
            raise ConfigError("restore(snapshot) needs a snapshot taken by this pruner's snapshot()")
        snapshot.restore()
        self._modules_cache = None
        self._retrace()

    # -- steps ---------------------------------------------------------------------------

    def measure(
        self,
        data: Iterable[Any],
        max_batches: int | None = None,
        *,
        progress: bool | None = None,
        stop: str | None = None,
        max_flip: float = 0.01,
        confidence: float = 0.95,
        tol: float = 0.02,
        plan_tol: float | None = 0.01,
    ) -> EntropyStats:
        """Measure the entropy of every site over ``data``.

        The options mean what they mean for :func:`egp_fast.measure_entropy`, which this calls
        with the pruner's traced graph, entropy mode and backend.

        With ``stop="decided"`` the pass also waits until this round's *plan* is known, not only
        the entropies: :func:`measure_entropy` gets a ``plan`` callback that turns the per-site
        entropies into what :meth:`plan` would decide, and every amount's jackknife 95% interval
        must be within ``max(plan_tol * amount, 0.5)`` (docs/confidence.md). For ``egp`` the
        amounts are the weights each layer would be pruned (before rounding down), so the
        rounded plan is expected within ``plan_tol`` of the whole pass's, plus one weight; for
        ``easier`` they are 1 for each site it would remove (the choice must not change when any
        one group of batches is left out); ``imp`` does not depend on entropies and adds no
        condition.

        Args:
            data: an iterable of batches on the model's device.
            max_batches: measure at most this many batches (``None``: all).
            progress: show a progress bar (``None``: the pruner's ``progress``).
            stop: ``None`` (the whole pass) or ``"decided"`` (stop as soon as every site is
                decided; see :func:`egp_fast.measure_entropy`).
            max_flip, confidence, tol: the early-stopping criteria of ``stop="decided"``.
            plan_tol: with ``stop="decided"``: relative tolerance on the plan's amounts, in
                (0, 1]; ``None`` stops on the entropies alone (the rule of ``measure_entropy``
                without a plan).

        Returns:
            :class:`egp_fast.EntropyStats` (no site when every site has been removed).

        Raises:
            DataError: ``data`` yields no batch.
            ConfigError: ``stop`` is set but this install's ``measure_entropy`` cannot stop
                early, or an option is out of range (the message names it).
        """
        example = self.example_inputs
        if self._graph is None and example is None:
            try:
                first = next(iter(data))
            except StopIteration:
                raise DataError("data yielded no batches; measuring entropy needs at least one") from None
            a, k = split_batch(first)
            example = k if k else (a[0] if len(a) == 1 else a)
        graph = self._ensure_graph(example)
        if len(graph) == 0:
            return _empty_stats(self.entropy_mode)
        check_plan(None, plan_tol)  # validate plan_tol also when no plan is built
        plan = self.plan_rule() if stop == "decided" and plan_tol is not None else None
        extra = self._stop_options(
            stop=stop, max_flip=max_flip, confidence=confidence, tol=tol, plan=plan, plan_tol=plan_tol
        )
        return measure_entropy(
            self.model,
            data,
            example_inputs=self.example_inputs,
            max_batches=max_batches,
            mode=self.entropy_mode,
            progress=self.progress if progress is None else progress,
            backend=self.backend,
            graph=graph,
            **extra,
        )

    @staticmethod
    def _stop_options(**given: Any) -> dict[str, Any]:
        supported = _measure_supports()
        if given["stop"] is not None and "stop" not in supported:
            raise ConfigError(
                f"stop={given['stop']!r}: this version of egp_fast.measure_entropy cannot stop "
                "early; use stop=None"
            )
        return {k: v for k, v in given.items() if k in supported}

    def plan_rule(self) -> Callable[[list[float], list[bool]], dict[str, float]] | None:
        """The ``plan`` callback :meth:`measure` gives ``measure_entropy(stop="decided")``.

        Returns:
            ``plan(entropy, constant) -> {key: amount}`` for the model as it is now (weights,
            masks, step), reading per-site entropies and zero-entropy flags in the order of
            :attr:`graph`'s sites; ``None`` for ``imp``, whose plan ignores entropies.

            * ``egp``: layer -> weights to prune, before rounding down (the allocation's shares;
              ``floor`` of them is :meth:`plan`'s answer on the same entropies).
            * ``easier``: site -> 1 for the sites :meth:`plan` would remove, 0 for the others.
        """
        graph = self._ensure_graph(self.example_inputs)
        sites = graph.sites
        if isinstance(self._method, _EGPMethod):
            view = self._layer_view()
            remaining = self._remaining()
            magnitude = layer_magnitudes(view, remaining)
            feeds = [(i, s.producers) for i, s in enumerate(sites) if s.producers]
            names = list(view)
            step = self.step

            def egp_plan(entropy: list[float], constant: list[bool]) -> dict[str, float]:
                layer_h: dict[str, float] = {}
                for i, producers in feeds:  # EntropyStats.layer_entropy: the largest per layer
                    for p in producers:
                        layer_h[p] = max(layer_h.get(p, 0.0), entropy[i])
                return round_shares({n: layer_h.get(n, 0.0) for n in names}, magnitude, remaining, step)

            return egp_plan
        if isinstance(self._method, EasierMethod):
            from egp_fast.folding.affine import unremovable_sites

            names = [s.name for s in sites]
            blocked = set(unremovable_sites(self.model, names))
            live = [(i, n) for i, n in enumerate(names) if n not in blocked]

            def easier_plan(entropy: list[float], constant: list[bool]) -> dict[str, float]:
                # egp_fast.pruning.choose_sites on these entropies: every zero-entropy site, and
                # the live one with the lowest entropy (ties: the first in execution order).
                out = dict.fromkeys((n for _, n in live), 0.0)
                best = None
                for i, n in live:
                    if constant[i]:
                        out[n] = 1.0
                    elif best is None or entropy[i] < entropy[best[0]]:
                        best = (i, n)
                if best is not None:
                    out[best[1]] = 1.0
                return out

            return easier_plan
        return None

    def track(self) -> contextlib.AbstractContextManager[Any]:
        """Count activation signs during the model's own (training) forwards.

        A context manager around :func:`egp_fast.measurement.track_entropy` with this pruner's
        graph and entropy mode: ``with pruner.track() as t: <one training epoch>`` and then
        ``pruner.plan(t.stats())`` needs no separate measurement pass (EASIER measures this
        way). Train-mode forwards differ from eval-mode ones (BatchNorm batch statistics,
        dropout, augmentation); see docs/confidence.md.

        Returns:
            A context manager yielding the tracker (``.stats()`` -> :class:`EntropyStats`).

        Raises:
            DataError: no ``example_inputs`` yet (pass them to the Pruner, or measure once).
            ConfigError: this install has no ``track_entropy``.

        Example:
            >>> import torch, egp_fast
            >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
            >>> pruner = egp_fast.Pruner(net, torch.randn(2, 4), progress=False)
            >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
            >>> with pruner.track() as t:  # one "epoch" of three training steps
            ...     for _ in range(3):
            ...         opt.zero_grad()
            ...         net(torch.randn(16, 4)).sum().backward()
            ...         opt.step()
            >>> plan = pruner.plan(t.stats())
            >>> list(plan), t.stats().sites["1"].samples
            (['0'], 48)
        """
        from egp_fast import measurement as _stats
        track_entropy = getattr(_stats, "track_entropy", None)
        if track_entropy is None:
            raise ConfigError("this version of egp_fast has no egp_fast.measurement.track_entropy; use measure(data)")
        graph = self._ensure_graph(self.example_inputs)
        return track_entropy(self.model, graph=graph, example_inputs=self.example_inputs, mode=self.entropy_mode,
                             backend=self.backend)

    def plan(self, stats: EntropyStats) -> dict[str, int]:
        """What this round changes.

        EGP: the budget ``step * (nonzero weights of eligible layers)`` is shared by
        :func:`allocate` among the layers whose site has nonzero entropy. IMP: one global
        magnitude ranking over all prunable layers. EASIER: the sites to remove.

        Args:
            stats: the :class:`EntropyStats` of :meth:`measure` (or of :meth:`track`).

        Returns:
            ``egp``/``imp``: ``{layer: count}`` for every prunable layer (0 for layers left
            alone). ``easier``: ``{site: 1}`` for each site to remove, in execution order.

        Raises:
            ConfigError: ``stats`` is not an :class:`EntropyStats` of this model.
        """
        if not isinstance(stats, EntropyStats):
            raise ConfigError(f"stats must be the EntropyStats of measure(), got {type(stats).__name__}")
        self._planned = stats
        return self._method.plan(self, stats, self._remaining())

    def apply(self, plan: dict[str, int], stats: EntropyStats | None = None) -> list[str]:
        """Carry out a plan.

        ``egp``/``imp``: prune ``plan[layer]`` more weights (smallest ``|w|`` first) in each
        layer; masks are updated and the pruned weights zeroed; nothing changes if the plan is
        invalid (unknown layer, negative count, more than the layer has left).
        ``easier``: replace each site with ``plan[site] == 1`` by an affine map (the sites are
        then gone from :attr:`graph`).

        Args:
            plan: the output of :meth:`plan` (possibly edited).
            stats: the statistics the plan came from (``easier`` needs them to build the maps;
                default: those of the last :meth:`plan` call).

        Returns:
            The sites removed (empty for ``egp``/``imp``).

        Raises:
            ConfigError: the plan names unknown layers or sites, or has impossible counts.
        """
        if not isinstance(plan, dict):
            raise ConfigError(f"plan must be the dict returned by plan(), got {type(plan).__name__}")
        removed = self._method.apply(self, plan, stats if stats is not None else self._planned)
        if removed:
            self._modules_cache = None
            self._retrace()
        return removed

    def round(self, data: Iterable[Any], max_batches: int | None = None, **measure_options: Any) -> RoundRecord:
        """One round: measure, plan and apply (and linearise, with ``linearize=True``).

        Args:
            data: measurement batches.
            max_batches: cap on measurement batches.
            **measure_options: ``stop``, ``max_flip``, ``confidence``, ``tol``, ``plan_tol``,
                ``progress`` as for :meth:`measure`.

        Returns:
            The round's :class:`RoundRecord` (``accuracy`` is left ``None``: the caller
            evaluates after fine-tuning).
        """
        start = time.perf_counter()
        stats = self.measure(data, max_batches, **measure_options)
        before = self._remaining()
        self._planned = stats
        plan = self._method.plan(self, stats, before)
        sites_of: dict[str, list[str]] = {}
        for s in stats.sites.values():
            for p in s.producers:
                sites_of.setdefault(p, []).append(s.name)
        zero = set(stats.zero_entropy_sites())
        layer_h = stats.layer_entropy()
        layers = []
        for n in self.prunable:
            sites = sites_of.get(n, [])
            layers.append(
                {
                    "name": n,
                    "site": ",".join(sites),
                    "entropy": layer_h.get(n),
                    "nonzero": before.get(n, 0),
                    "pruned": int(plan.get(n, 0)),
                    "collapsible": bool(sites) and all(s in zero for s in sites),
                }
            )
        removed = self.apply(plan, stats)
        after = {n: before[n] - int(plan.get(n, 0)) for n in before}
        if self.linearize and zero and self._method.prunes_weights:
            from egp_fast.folding import linearize

            removed = linearize(self.model, stats)
            if removed:
                self._modules_cache = None
                self._retrace()
                after = self._remaining()
        record = RoundRecord(
            iteration=self.iteration,
            sparsity=self._sparsity(after),
            layers=layers,
            seconds=time.perf_counter() - start,
            zero_entropy_sites=sorted(zero, key=list(stats.sites).index),
            stats=stats.to_dict(),
            removed_sites=list(removed),
            sites_left=len(self._graph) if self._graph is not None else None,
            method=self.method,
        )
        self.iteration += 1
        return record


# --------------------------------------------------------------------------------------------
# One call.


def prune(
    model: nn.Module,
    data: Iterable[Any],
    *,
    finetune: Callable[[nn.Module, int], Any] | None = None,
    iterations: int = 9,
    step: float = 0.5,
    method: str = "egp",
    example_inputs: Any = None,
    max_batches: int | None = None,
    collapse: bool = False,
    progress: bool = True,
    backend: str | None = None,
    linearize: bool = False,
    entropy_mode: str = "exact",
    masked_linear: bool = False,
    evaluate: Callable[[nn.Module], float] | None = None,
    max_drop: float | None = None,
    linearization: str = "identity",
    measure_stop: str | None = None,
    max_flip: float = 0.01,
    confidence: float = 0.95,
) -> PruneResult:
    """Prune ``model`` in rounds with EGP, IMP or EASIER, fine-tuning after each round.

    Each round measures the activation entropies on ``data`` and then, by ``method``:

    * ``"egp"``: prunes ``step`` of the remaining weights of the eligible layers, shared by
      entropy and magnitude; ``"imp"``: one global magnitude threshold. Masks keep pruned
      weights at zero through your optimizer. Stops early when no layer is eligible.
    * ``"easier"``: replaces the live activation site with the lowest entropy (ties: the
      first in execution order), and every site already at zero entropy, by an affine map
      (``linearization``); stops early when no site is left.

    Then it calls ``finetune(model, round)`` and, if given, ``evaluate(model)``. With
    ``evaluate`` and a tolerance (``max_drop``; EASIER always has one) the dense model is
    evaluated once before the first round, and the run stops at the first round whose
    accuracy is more than ``max_drop`` below it: that round is rolled back (its record stays,
    with ``kept=False``) and the model of the last round within the tolerance is returned.

    Rounds are atomic. If anything fails inside a round (measure, plan, apply, ``finetune``,
    ``evaluate``), the model goes back to the end of the last *completed* round (weights,
    masks, hooks, ``training`` flags, linearised modules) and:

    * an ``Exception`` is re-raised as :class:`~egp_fast.errors.PruneInterrupted` (``from``
      the original): ``.result`` is a :class:`PruneResult` of the completed rounds,
      ``.original`` the exception;
    * a ``KeyboardInterrupt`` (Ctrl-C) or other ``BaseException`` is re-raised unchanged, with
      the same partial :class:`PruneResult` attached as its ``.result`` attribute, so Ctrl-C
      still stops your script but nothing finished is lost.

    A failure before the first round completes (bad batches, a crash in the first
    fine-tune) restores the model exactly as it was passed and re-raises the original
    exception. Optimizers and schedulers are yours and are not rolled back: build them anew
    before training the restored model further.

    Args:
        model: the network, changed in place.
        data: measurement batches (tensors, ``(inputs, labels)``, or dicts), on the model's device.
        finetune: ``finetune(model, round_index)`` called after each round; ``None`` skips it.
        iterations: number of rounds, >= 1 (the paper uses 9).
        step: fraction pruned per round, in (0, 1) (the paper uses 0.5; unused by ``easier``).
        method: ``"egp"``, ``"imp"`` or ``"easier"``.
        example_inputs: a batch for tracing (default: the first batch of ``data``).
        max_batches: cap on measurement batches per round.
        collapse: after the last round, fold zero-entropy and linearised layers away
            (:func:`egp_fast.collapse`); ``result.model`` is then the collapsed model.
        progress: show progress bars.
        backend: force a compute backend (``None``: automatic).
        linearize: ``egp``/``imp``: replace zero-entropy sites by affine maps between rounds.
        entropy_mode: ``"exact"`` or ``"paper"``.
        masked_linear: swap pruned ``nn.Linear`` layers for tile-skipping
            :class:`~egp_fast.modules.MaskedLinear` modules.
        evaluate: ``evaluate(model) -> float``, the accuracy in [0, 1] on a *validation*
            split (never the test split); required for ``easier``.
        max_drop: the largest accepted accuracy drop below the dense model, as a fraction
            (0.01 = one point); default 0.01 for ``easier``, no tolerance for ``egp``/``imp``
            (set it, with ``evaluate``, to get the same roll-back there).
        linearization: ``easier``: ``"identity"`` (EASIER's choice: the site becomes
            ``y = z``) or ``"majority"`` (per channel: identity when mostly ON, zero when
            mostly OFF).
        measure_stop: passed to each round's measurement as ``stop`` (``None``: a whole pass;
            ``"decided"``: stop when every site is decided and the round's plan is known, see
            :meth:`Pruner.measure`; the final measurement, which only feeds ``collapse``, waits
            for the sites alone).
        max_flip, confidence: the evidence a zero-entropy site needs (its flip bound at
            ``confidence``, :meth:`SiteStats.flip_bound`, at most ``max_flip``) to be removed by
            ``collapse=True``, and to count as decided with ``measure_stop="decided"``;
            ``max_flip=1.0`` trusts any amount of data.

    Returns:
        :class:`PruneResult`: the model, one :class:`RoundRecord` per round (with
        ``removed_sites`` and ``accuracy``), the final statistics, ``dense_accuracy`` and
        ``best_round``.

    Raises:
        ConfigError: a bad argument (named in the message), e.g. ``easier`` without
            ``evaluate``.
        DataError: the data cannot be used with the model.
        PruneInterrupted: a round failed after at least one had completed (see above).

    Example:
        >>> import torch, egp_fast
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> data = [torch.randn(64, 4)]
        >>> result = egp_fast.prune(net, data, iterations=2, progress=False)
        >>> [r.sparsity for r in result.rounds]
        [0.5, 0.75]
        >>> deep = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
        ...                            torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> result = egp_fast.prune(deep, data, method="easier", evaluate=lambda m: 0.9,
        ...                         iterations=5, progress=False)
        >>> [r.removed_sites for r in result.rounds], result.best_round
        ([['3'], ['1']], 1)
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ConfigError(f"iterations={iterations!r} must be an int >= 1 (the number of pruning rounds)")
    if finetune is not None and not callable(finetune):
        raise ConfigError("finetune must be a callable finetune(model, round_index) or None")
    if evaluate is not None and not callable(evaluate):
        raise ConfigError("evaluate must be a callable evaluate(model) -> accuracy in [0, 1], or None")
    _check_step(step)
    _check_method(method)
    check_linearization(linearization)
    if method == "easier":
        if evaluate is None:
            raise ConfigError(
                "method='easier' needs evaluate=fn: fn(model) -> accuracy in [0, 1] on a validation "
                "split; EASIER keeps the last model within max_drop of the dense accuracy"
            )
        max_drop = 0.01 if max_drop is None else max_drop
    if max_drop is not None:
        max_drop = check_max_drop(max_drop)
        if evaluate is None:
            raise ConfigError(f"max_drop={max_drop} needs evaluate=fn to measure the accuracy drop")
    from egp_fast.measurement.decide import check_confidence, check_fraction

    max_flip = check_fraction(max_flip, "max_flip")
    confidence = check_confidence(confidence)
    if measure_stop not in (None, "decided"):
        raise ConfigError(f"measure_stop={measure_stop!r}; use None (a whole pass) or 'decided'")
    if data is None:
        raise DataError("data is None; pass an iterable of batches")
    config = {
        "iterations": iterations,
        "step": step,
        "method": method,
        "max_batches": max_batches,
        "collapse": collapse,
        "linearize": linearize,
        "entropy_mode": entropy_mode,
        "backend": backend,
        "masked_linear": masked_linear,
        "max_drop": max_drop,
        "linearization": linearization,
        "measure_stop": measure_stop,
        "max_flip": max_flip,
        "confidence": confidence,
    }
    target = unwrap_model(model)
    # The state a failure returns to: the model as passed, then the end of each completed round.
    snapshot = ModelSnapshot(target)
    completed = False
    rounds: list[RoundRecord] = []
    result = PruneResult(target, rounds, None, None, config)
    measure_options = (
        {"stop": measure_stop, "max_flip": max_flip, "confidence": confidence} if measure_stop is not None else {}
    )
    try:
        pruner = Pruner(
            target,
            example_inputs,
            step=step,
            method=method,
            linearize=linearize,
            backend=backend,
            entropy_mode=entropy_mode,
            progress=progress,
            masked_linear=masked_linear,
            linearization=linearization,
        )
        if evaluate is not None:
            result.dense_accuracy = check_accuracy(evaluate(model), "before the first round")
        for i in range(iterations):
            if pruner._graph is not None and len(pruner._graph) == 0:
                break  # EASIER removed every site
            record = pruner.round(data, max_batches, **measure_options)
            if not pruner._method.progressed(record):
                rounds.append(record)  # the record says why: nothing eligible, or no site left
                result.best_round = len(rounds) - 1
                break
            if finetune is not None:
                finetune(model, i)
            if evaluate is not None:
                record.accuracy = check_accuracy(evaluate(model), f"after round {i}")
            rounds.append(record)
            if max_drop is not None and not within_tolerance(record.accuracy, result.dense_accuracy, max_drop):
                record.kept = False
                pruner.restore(snapshot)  # back to the best model: the last round within tolerance
                break
            snapshot.take(target)
            completed = True
            result.best_round = len(rounds) - 1
        # The last measurement feeds collapse, not a plan: no plan rule to wait for.
        final_options = dict(measure_options, plan_tol=None) if measure_options else {}
        result.stats = pruner.measure(data, max_batches, **final_options)
        if collapse:
            from egp_fast.folding.collapser import collapse as _collapse

            result.collapse = _collapse(
                target, result.stats, pruner.example_inputs, max_flip=max_flip, confidence=confidence
            )
            result.model = result.collapse.model
        return result
    except BaseException as e:
        if snapshot.complete:
            snapshot.restore()
        elif rounds and rounds[-1].kept:
            # Interrupted while recording the round that had just completed: the model is at
            # its end, untouched; the half-written snapshot is what must not be used.
            completed = True
            result.best_round = len(rounds) - 1
        if not completed:
            raise
        partial = PruneResult(target, list(rounds), None, None, config, result.dense_accuracy, result.best_round)
        if isinstance(e, Exception):
            raise PruneInterrupted(partial, e) from e
        e.result = partial  # KeyboardInterrupt, SystemExit: keep their type, attach the work done
        raise
