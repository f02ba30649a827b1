"""The EGP loop: measure entropies, share the budget, prune, fine-tune; and the IMP baseline.

:class:`Pruner` runs one step at a time (``measure`` -> ``plan`` -> ``apply``) for users who
own their training loop; :func:`prune` runs whole rounds with an optional fine-tune callback.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from egp_fast import masks as _masks
from egp_fast import ops
from egp_fast.budget import allocate
from egp_fast.errors import ConfigError, DataError
from egp_fast.graph import SiteGraph, _unwrap, discover_sites, weight_layers
from egp_fast.ops._dispatch import backend_for
from egp_fast.stats import EntropyStats, measure_entropy, split_batch

METHODS = ("egp", "imp")


# --------------------------------------------------------------------------------------------
# Records.


@dataclass
class RoundRecord:
    """What one pruning round did.

    Attributes:
        iteration: 0-based round index.
        sparsity: fraction of pruned weights over the prunable layers, after the round.
        layers: one dict per prunable layer: ``name``, ``site`` (the site(s) it feeds),
            ``entropy`` (of that site, before pruning), ``nonzero`` (unpruned weights before),
            ``pruned`` (this round), ``collapsible`` (its site is already at zero entropy).
        seconds: wall time of the round (measure + plan + apply).
        zero_entropy_sites: sites at zero entropy when the round measured.
        stats: the round's entropy measurement, as ``EntropyStats.to_dict()``.
    """

    iteration: int
    sparsity: float
    layers: list[dict[str, Any]]
    seconds: float
    zero_entropy_sites: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def pruned(self) -> int:
        return sum(layer["pruned"] for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "sparsity": self.sparsity,
            "pruned": self.pruned,
            "seconds": self.seconds,
            "zero_entropy_sites": list(self.zero_entropy_sites),
            "layers": [dict(x) for x in self.layers],
            "stats": self.stats,
        }


@dataclass
class PruneResult:
    """Result of :func:`prune`.

    Attributes:
        model: the pruned model (the same object that was passed), or the collapsed model
            when ``collapse=True``.
        rounds: one :class:`RoundRecord` per round run.
        stats: the entropy measurement after the last round (what collapse used).
        collapse: the :class:`~egp_fast.collapse.CollapseResult`, when ``collapse=True``.
        config: the arguments of the run, JSON-safe.
    """

    model: nn.Module
    rounds: list[RoundRecord]
    stats: EntropyStats | None = None
    collapse: Any = None
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary: config, rounds, final entropies and the collapse report."""
        return {
            "config": dict(self.config),
            "rounds": [r.to_dict() for r in self.rounds],
            "final": self.stats.to_dict() if self.stats is not None else None,
            "collapse": self.collapse.to_dict() if hasattr(self.collapse, "to_dict") else None,
        }


# --------------------------------------------------------------------------------------------
# Leave-nothing-behind snapshot.


class _Snapshot:
    """Structure, hooks, flags and tensor values of a model, restorable after a failure.

    Values are copied to the CPU so a GPU model does not need twice its memory.
    """

    def __init__(self, model: nn.Module, values: bool = True) -> None:
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
        self.values: list[tuple[torch.Tensor, torch.Tensor]] = []
        if values:
            seen: set[int] = set()
            for m in model.modules():
                for t in list(m._parameters.values()) + list(m._buffers.values()):
                    if t is not None and id(t) not in seen:
                        seen.add(id(t))
                        self.values.append((t, t.detach().to("cpu", copy=True)))

    def restore(self) -> None:
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
        with torch.no_grad():
            for t, v in self.values:
                t.copy_(v.to(t.device))
        for m, *_ in self.modules[:1]:
            _masks.release(m)


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
        raise ConfigError(f"method={method!r} is not a pruning method; use 'egp' or 'imp'")
    return method


class Pruner:
    """Step-wise EGP (or IMP) pruning of one model.

    Args:
        model: the network to prune, in place (a DDP/DataParallel wrapper is unwrapped).
        example_inputs: a batch the model accepts, for tracing; default: the inputs of the
            first batch that :meth:`measure` sees.
        step: fraction of the eligible layers' remaining weights pruned per round, in (0, 1).
        method: ``"egp"`` (entropy-guided, prunes the producers of activation sites) or
            ``"imp"`` (one global magnitude threshold over every Conv/Linear layer).
        layers: prune these layers instead of the method's default set.
        linearize: replace zero-entropy sites by their affine equivalent at each round, so
            fine-tuning trains the shallower model (the prune-collapse loop).
        backend: force a compute backend for the ops (``None``: automatic).
        entropy_mode: ``"exact"`` or ``"paper"`` (see :func:`measure_entropy`).
        progress: show progress bars.
        masked_linear: swap each pruned ``nn.Linear`` for :class:`egp_fast.modules.MaskedLinear`
            (same Parameters), whose forward skips all-zero weight tiles on a GPU.

    Example:
        >>> pruner = egp_fast.Pruner(model, x)             # doctest: +SKIP
        >>> stats = pruner.measure(loader)                 # doctest: +SKIP
        >>> pruner.apply(pruner.plan(stats))               # doctest: +SKIP
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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = _unwrap(model)
        self.step = _check_step(step)
        self.method = _check_method(method)
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
        self.iteration = 0
        if self._layers is not None:
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

    def _swap_masked_linear(self) -> bool:
        from egp_fast.modules import MaskedLinear

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
        if self.method == "imp":
            return weight_layers(self.model)
        return self._graph.producer_layers()

    @property
    def graph(self) -> SiteGraph:
        """The sites of the model (traced on the example inputs)."""
        return self._ensure_graph(self.example_inputs)

    @property
    def prunable(self) -> list[str]:
        """Names of the layers this pruner prunes, in site order."""
        return list(self._modules())

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
        return {n: int(m.sum()) for n, (_, m) in self._layer_view().items()}

    def _sparsity(self, remaining: dict[str, int]) -> float:
        view = self._layer_view()
        total = sum(view[n][1].numel() for n in remaining)
        return 1.0 - sum(remaining.values()) / total if total else 0.0

    # -- steps ---------------------------------------------------------------------------

    def measure(self, data: Iterable[Any], max_batches: int | None = None) -> EntropyStats:
        """Measure the entropy of every site over ``data`` (see :func:`measure_entropy`)."""
        example = self.example_inputs
        if self._graph is None and example is None:
            try:
                first = next(iter(data))
            except StopIteration:
                raise DataError("data yielded no batches; measuring entropy needs at least one") from None
            a, k = split_batch(first)
            example = k if k else (a[0] if len(a) == 1 else a)
        graph = self._ensure_graph(example)
        return measure_entropy(
            self.model,
            data,
            example_inputs=self.example_inputs,
            max_batches=max_batches,
            mode=self.entropy_mode,
            progress=self.progress,
            backend=self.backend,
            graph=graph,
        )

    def _layer_view(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {n: (m.weight, getattr(m, _masks.MASK)) for n, m in self._modules().items()}

    def plan(self, stats: EntropyStats) -> dict[str, int]:
        """How many more weights to prune in each prunable layer this round.

        EGP: the budget ``step * (nonzero weights of eligible layers)`` is shared by
        :func:`allocate` among the layers whose site has nonzero entropy. IMP: one global
        magnitude ranking over all prunable layers.

        Returns:
            ``{layer: count}`` for every prunable layer (0 for layers left alone).
        """
        if not isinstance(stats, EntropyStats):
            raise ConfigError(f"stats must be the EntropyStats of measure(), got {type(stats).__name__}")
        return self._plan(stats, self._remaining())

    def _plan(self, stats: EntropyStats, remaining: dict[str, int]) -> dict[str, int]:
        view = self._layer_view()
        if self.method == "imp":
            count = int(math.floor(self.step * sum(remaining.values())))
            names = list(view)
            new = ops.global_smallest(
                [view[n][0] for n in names], [view[n][1] for n in names], count,
                backend=backend_for("global_smallest", self.backend),
            )
            return {n: remaining[n] - int(m.sum()) for n, m in zip(names, new)}
        layer_h = stats.layer_entropy()
        missing = [n for n in view if n not in layer_h]
        entropy = {n: layer_h.get(n, 0.0) for n in view}
        if missing and len(missing) == len(view):
            raise ConfigError(
                "stats does not describe this model's prunable layers (no site produced by "
                f"{missing[:3]}); measure with this pruner's measure()"
            )
        magnitude = {}
        for n, (w, _) in view.items():
            kept = remaining[n]
            # Pruned weights are exactly zero (masks are enforced), so the L1 norm of the whole
            # weight is the sum of |w| over the kept ones: no masked temporary needed.
            magnitude[n] = float(torch.linalg.vector_norm(w.detach(), 1)) / kept if kept else 0.0
        eligible = [n for n in view if entropy[n] > 0 and remaining[n] > 0]
        budget = self.step * sum(remaining[n] for n in eligible)
        return allocate(entropy, magnitude, remaining, budget)

    def apply(self, plan: dict[str, int]) -> None:
        """Prune ``plan[layer]`` more weights (smallest ``|w|`` first) in each layer.

        Masks are updated and the pruned weights zeroed; nothing changes if the plan is
        invalid (unknown layer, negative count, more than the layer has left).
        """
        view = self._layer_view()
        names = [n for n in view if plan.get(n, 0)]
        unknown = [n for n in plan if n not in view]
        if unknown:
            raise ConfigError(
                f"plan names layers this pruner does not prune: {unknown[:5]}; prunable layers "
                f"are {list(view)[:5]}{'...' if len(view) > 5 else ''}"
            )
        if not names:
            return
        new = ops.select_smallest(
            [view[n][0] for n in names],
            [view[n][1] for n in names],
            [int(plan[n]) for n in names],
            backend=backend_for("select_smallest", self.backend),
        )
        _masks.set_masks(self.model, dict(zip(names, new)))

    def round(self, data: Iterable[Any], max_batches: int | None = None) -> RoundRecord:
        """One round: measure, (linearise), plan and apply. Returns its :class:`RoundRecord`."""
        start = time.perf_counter()
        stats = self.measure(data, max_batches)
        before = self._remaining()
        plan = self._plan(stats, before)
        sites_of: dict[str, list[str]] = {}
        for s in stats.sites.values():
            for p in s.producers:
                sites_of.setdefault(p, []).append(s.name)
        self.apply(plan)
        layers = []
        zero = set(stats.zero_entropy_sites())
        layer_h = stats.layer_entropy()
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
        after = {n: before[n] - int(plan.get(n, 0)) for n in before}
        if self.linearize and zero:
            from egp_fast.collapse import linearize as _linearize

            _linearize(self.model, stats)
            self._graph = None  # the sites changed: trace again next time
            self._ensure_graph(self.example_inputs)
            after = self._remaining()
        record = RoundRecord(
            iteration=self.iteration,
            sparsity=self._sparsity(after),
            layers=layers,
            seconds=time.perf_counter() - start,
            zero_entropy_sites=sorted(zero, key=list(stats.sites).index),
            stats=stats.to_dict(),
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
) -> PruneResult:
    """Prune ``model`` in rounds with EGP (or IMP), fine-tuning after each round.

    Each round measures the activation entropies on ``data``, prunes ``step`` of the
    remaining weights of the eligible layers (EGP: shared by entropy and magnitude; IMP: one
    global magnitude threshold), then calls ``finetune(model, round)``; masks keep pruned
    weights at zero through your optimizer. Stops early when no layer is eligible. On any
    exception the model is restored exactly as it was passed.

    Args:
        model: the network, pruned in place.
        data: measurement batches (tensors, ``(inputs, labels)``, or dicts), on the model's device.
        finetune: ``finetune(model, round_index)`` called after each round; ``None`` skips it.
        iterations: number of rounds, >= 1 (the paper uses 9).
        step: fraction pruned per round, in (0, 1) (the paper uses 0.5).
        method: ``"egp"`` or ``"imp"``.
        example_inputs: a batch for tracing (default: the first batch of ``data``).
        max_batches: cap on measurement batches per round.
        collapse: after the last round, fold zero-entropy layers away
            (:func:`egp_fast.collapse`); ``result.model`` is then the collapsed model.
        progress: show progress bars.
        backend: force a compute backend (``None``: automatic).
        linearize: replace zero-entropy sites by affine maps between rounds.
        entropy_mode: ``"exact"`` or ``"paper"``.
        masked_linear: swap pruned ``nn.Linear`` layers for tile-skipping
            :class:`~egp_fast.modules.MaskedLinear` modules.

    Returns:
        :class:`PruneResult`.

    Example:
        >>> result = egp_fast.prune(model, loader, iterations=2, finetune=train_one_epoch)  # doctest: +SKIP
        >>> [round(r.sparsity, 2) for r in result.rounds]                                    # doctest: +SKIP
        [0.5, 0.75]
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ConfigError(f"iterations={iterations!r} must be an int >= 1 (the number of pruning rounds)")
    if finetune is not None and not callable(finetune):
        raise ConfigError("finetune must be a callable finetune(model, round_index) or None")
    _check_step(step)
    _check_method(method)
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
    }
    target = _unwrap(model)
    snapshot = _Snapshot(target)
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
        )
        rounds: list[RoundRecord] = []
        for i in range(iterations):
            record = pruner.round(data, max_batches)
            rounds.append(record)
            if record.pruned == 0:
                break  # nothing eligible: every prunable site is collapsible or empty
            if finetune is not None:
                finetune(model, i)
        stats = pruner.measure(data, max_batches)
        result = PruneResult(model, rounds, stats, None, config)
        if collapse:
            from egp_fast.collapse import collapse as _collapse

            result.collapse = _collapse(target, stats, pruner.example_inputs)
            result.model = result.collapse.model
        return result
    except BaseException:
        snapshot.restore()
        raise
