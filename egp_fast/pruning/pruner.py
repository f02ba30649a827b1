"""The step-wise pruner: :class:`Pruner` runs one round of any registered method at a time.

A *method* (:mod:`egp_fast.pruning.methods`, looked up by name in its registry) says what a
round changes: EGP and IMP prune a budget of weights, EASIER linearises activation sites. The
Pruner owns the model's structure around it (traced sites, masks, snapshots) and runs the
steps ``measure`` -> ``plan`` -> ``apply`` (or ``round``) for users who own their training loop
and for the ``egp-fast`` command; :func:`egp_fast.prune` (:mod:`egp_fast.pruning.loop`) adds
fine-tuning, evaluation and roll-back around whole rounds. The records and the snapshot that
rolls a round back are in :mod:`egp_fast.pruning.records`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn

from egp_fast.errors import ConfigError, DataError, ModelError
from egp_fast.folding import linearize
from egp_fast.graph import SiteGraph, discover_sites, unwrap_model, weight_layers
from egp_fast.masks import MASK, MaskedLinear, attach_masks, masked_layers, rebind
from egp_fast.measurement import EntropyStats, check_plan, measure_entropy, split_batch, track_entropy
from egp_fast.pruning.checks import check_entropy_mode, check_linearization, check_step
from egp_fast.pruning.methods import MethodContext, PlanRule, PruningMethod, get_method
from egp_fast.pruning.records import ModelSnapshot, RoundRecord, layer_rows

__all__ = ["Pruner"]


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
            ``"easier"`` (removes the lowest-entropy activation site each round), or a name
            added with :func:`egp_fast.pruning.register_method`.
        layers: prune these layers instead of the method's default set (not with ``easier``).
        linearize: ``egp``/``imp``: replace zero-entropy sites by their affine equivalent at
            each round, so fine-tuning trains the shallower model (the prune-collapse loop).
        backend: force a compute backend for the ops (``None``: automatic).
        entropy_mode: ``"exact"`` or ``"paper"`` (see :func:`measure_entropy`).
        progress: show progress bars.
        masked_linear: swap each pruned ``nn.Linear`` for :class:`egp_fast.MaskedLinear`
            (same Parameters), whose forward skips all-zero weight tiles on a GPU.
        linearization: ``easier`` only: ``"identity"`` (the site becomes ``y = z``, as in the
            EASIER paper) or ``"majority"`` (per channel: identity where ``p_on >= 0.5``, zero
            otherwise; the dead channels then prune away in collapse).
        method_options: more options for the method's factory, e.g. ``{"objective": "latency",
            "target_speedup": 1.5}`` for ``easier`` (see :func:`egp_fast.prune`).

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
        method_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = unwrap_model(model)
        self.step = check_step(step)
        if method_options is not None and not isinstance(method_options, Mapping):
            raise ConfigError(f"method_options must be a dict of the method's options, got {method_options!r}")
        self._method = get_method(method, linearization=linearization, **dict(method_options or {}))
        self.method = method
        self.linearization = check_linearization(linearization)
        self.entropy_mode = check_entropy_mode(entropy_mode)
        self.linearize = bool(linearize)
        self.backend = backend
        self.progress = progress
        self.masked_linear = bool(masked_linear)
        self.example_inputs = example_inputs
        self._layers = list(layers) if layers is not None else None
        self._graph: SiteGraph | None = None
        self._planned: EntropyStats | None = None
        self._modules_cache: tuple[SiteGraph, dict[str, nn.Module]] | None = None
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
            attach_masks(self.model, self._default_layers())
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
        swapped = False
        for name in self._default_layers():
            layer = self.model.get_submodule(name)
            if type(layer) is not nn.Linear:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            new = MaskedLinear.from_linear(layer, backend=self.backend)
            setattr(parent, child, new)
            rebind(new)
            swapped = True
        return swapped

    def _default_layers(self) -> list[str]:
        if self._layers is not None:
            return list(self._layers)
        return self._method.layers(self.model, self._ensure_graph(self.example_inputs))

    @property
    def method_impl(self) -> PruningMethod:
        """The :class:`~egp_fast.pruning.PruningMethod` this pruner runs (built from ``method``)."""
        return self._method

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
        # Walking named_modules() is slow on a large model: do it once per traced graph.
        graph = self._ensure_graph(self.example_inputs)
        cache = self._modules_cache
        if cache is None or cache[0] is not graph:
            layers = masked_layers(self.model)
            cache = (graph, {n: layers[n] for n in self._default_layers() if n in layers})
            self._modules_cache = cache
        return cache[1]

    def sparsity(self) -> float:
        """Fraction of pruned weights over the prunable layers."""
        return self._sparsity(self._remaining())

    def _remaining(self) -> dict[str, int]:
        """Unpruned weights per prunable layer (one reduction per layer)."""
        return self._context().remaining()

    def _sparsity(self, remaining: dict[str, int]) -> float:
        view = self._layer_view()
        total = sum(view[n][1].numel() for n in remaining)
        return 1.0 - sum(remaining.values()) / total if total else 0.0

    def _layer_view(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {n: (m.weight, getattr(m, MASK)) for n, m in self._modules().items()}

    def _context(self) -> MethodContext:
        """What the method sees of the model now."""
        graph = self._ensure_graph(self.example_inputs)
        return MethodContext(self.model, graph, self._layer_view(), self.step, self.backend)

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
            ConfigError: an option is out of range (the message names it).
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
        return measure_entropy(
            self.model,
            data,
            example_inputs=self.example_inputs,
            max_batches=max_batches,
            mode=self.entropy_mode,
            progress=self.progress if progress is None else progress,
            backend=self.backend,
            graph=graph,
            stop=stop,
            max_flip=max_flip,
            confidence=confidence,
            tol=tol,
            plan=plan,
            plan_tol=plan_tol,
        )

    def plan_rule(self) -> PlanRule | None:
        """The ``plan`` callback :meth:`measure` gives ``measure_entropy(stop="decided")``.

        Returns:
            ``plan(entropy, constant) -> {key: amount}`` for the model as it is now (weights,
            masks, step), reading per-site entropies and zero-entropy flags in the order of
            :attr:`graph`'s sites: the method's :meth:`~egp_fast.pruning.PruningMethod.plan_rule`.
            ``None`` for a method whose plan reads no entropy (``imp``).

            * ``egp``: layer -> weights to prune, before rounding down (the allocation's shares;
              ``floor`` of them is :meth:`plan`'s answer on the same entropies).
            * ``easier``: site -> 1 for the sites :meth:`plan` would remove, 0 for the others.
        """
        if not self._method.needs_entropy:
            return None
        return self._method.plan_rule(self._context())

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
        return self._method.plan(self._context(), stats, self._remaining())

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
        removed = self._method.apply(self._context(), plan, stats if stats is not None else self._planned)
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
        plan = self._method.plan(self._context(), stats, before)
        layers = layer_rows(stats, self.prunable, before, plan)
        zero = stats.zero_entropy_sites()
        removed = self.apply(plan, stats)
        after = {n: before[n] - int(plan.get(n, 0)) for n in before}
        if self.linearize and zero and self._method.prunes_weights:
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
            zero_entropy_sites=zero,
            stats=stats.to_dict(),
            removed_sites=list(removed),
            sites_left=len(self._graph) if self._graph is not None else None,
            method=self.method,
        )
        self.iteration += 1
        return record

