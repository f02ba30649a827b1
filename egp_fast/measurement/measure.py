"""Entropy measurement: :func:`measure_entropy`, one pass over the data, then entropies.

Exact counting (the default) accumulates integer counts of ``z > breakpoint`` for every
site, channel and breakpoint over the whole pass, on the model's device, and computes the
entropies once at the end (order-free, and summable across processes with ``all_reduce``).
``mode="paper"`` reproduces the reference scripts: per batch, the channels constant in that
batch are left out, the others' binary entropies (``p`` clamped to ``[1e-5, 1 - 1e-5]`` inside
the logs) are averaged, and the batch values are averaged over batches (docs/algorithm.md,
"Entropy").

The model measured is the model the user runs: sites that are modules are counted by hooks on
the real model; only models with functional activations (``F.relu``...) are measured through
the fx-traced graph, which is checked against ``model.forward`` on the first batch of every
pass. Each site also records how many input samples it saw, and a zero-entropy site gets an
upper confidence bound on its flip probability (see ``docs/confidence.md``).

This module runs the pass (arguments, the batch loop, the check of the traced graph, the
search for a NaN/Inf); the counts live in ``counting.py``, the hooks and the instrumented
graph that feed them in ``recorders.py``, the result records in ``stats.py`` and the
stopping rules in ``decide.py``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from egp_fast._progress import progress_bar
from egp_fast.errors import ConfigError, DataError, EGPError, ModelError, NumericsError
from egp_fast.graph import Site, SiteGraph, describe_inputs, eval_mode, placeholder_args, unwrap_model
from egp_fast.measurement.batches import _check_device, _tensors, batch_size, model_device, split_batch
from egp_fast.measurement.counting import _all_reduce, _Counter, _finish, _sum_across_ranks
from egp_fast.measurement.decide import Decider, PlanFn, check_confidence, check_fraction, check_plan
from egp_fast.measurement.discover import _compare_outputs, cached_graph
from egp_fast.measurement.recorders import _cached_instrument, _HookRecorder, _instrument
from egp_fast.measurement.stats import EntropyStats
from egp_fast.ops import backend_for


# --------------------------------------------------------------------------------------------
# Arguments.


def _is_reiterable(data: Any) -> bool:
    return iter(data) is not data


def _check_measure_args(mode, max_batches, stop, max_flip, confidence, tol, min_batches) -> None:
    if mode not in ("exact", "paper"):
        raise ConfigError(f"mode={mode!r} is not a measurement mode; use 'exact' or 'paper'")
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ConfigError(f"max_batches={max_batches!r} must be a positive int or None")
    if stop not in (None, "decided"):
        raise ConfigError(f"stop={stop!r} is not a stopping rule; use None (whole pass) or 'decided'")
    check_fraction(max_flip, "max_flip")
    check_confidence(confidence)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0 or math.isinf(tol):
        raise ConfigError(f"tol={tol!r} must be a positive number of bits (e.g. 0.02)")
    if isinstance(min_batches, bool) or not isinstance(min_batches, int) or min_batches < 1:
        raise ConfigError(f"min_batches={min_batches!r} must be a positive int")


def measure_entropy(
    model: nn.Module,
    data: Iterable[Any],
    example_inputs: Any = None,
    max_batches: int | None = None,
    mode: str = "exact",
    progress: bool = True,
    backend: str | None = None,
    graph: SiteGraph | None = None,
    *,
    stop: str | None = None,
    max_flip: float = 0.01,
    confidence: float = 0.95,
    tol: float = 0.02,
    min_batches: int = 2,
    plan: PlanFn | None = None,
    plan_tol: float | None = 0.01,
) -> EntropyStats:
    """Measure the activation entropy of every site of ``model`` over ``data``.

    The model runs in eval mode under ``no_grad`` (its training flags are restored after);
    counts stay on the model's device until the pass ends; under ``torch.distributed`` the
    counts and samples of all ranks are summed, so every rank gets the same statistics.

    What runs is the user's model: when every site is an activation module, hooks on the real
    model count them (nothing is traced at run time). A model with functional activations
    (``F.relu``, ``x.relu()``) is measured through its fx-traced graph; on the first batch of
    every call that graph's output is compared with ``model.forward``'s on the same batch, and
    a difference (Python-side state or branches the trace froze) raises :class:`ModelError`.
    Site discovery is cached per model (see :func:`cached_graph`): a second call on the same,
    unchanged model does not discover again.

    ``stop="decided"`` ends the pass early, once (checked after each batch, every 4th on an
    accelerator, from ``min_batches`` on) every site is decided -- it changed state, or it did
    not on enough samples that its :meth:`SiteStats.flip_bound` is ``<= max_flip`` -- and every
    non-zero entropy that feeds the allocation (sites with producers) is known within ``tol``
    bits: ``1.96 * se <= tol``, ``se`` a delete-a-group jackknife over batches (up to 20
    groups; exact mode) or the standard error of the per-batch values (paper mode). With a
    ``plan`` it also waits until the decision those entropies feed is known: ``plan(entropy,
    constant)`` gets the per-site entropies and zero-entropy flags (lists in site order, summed
    across ranks) and returns amounts ``{key: number}``; the pass goes on until every amount's
    jackknife 95% interval is within ``max(plan_tol * |amount|, 0.5)`` (Student-t quantile, and
    a finite-population factor when the pass length is known; see docs/confidence.md).
    :meth:`Pruner.measure` passes the plan of its method (EGP: the weights per layer).

    Args:
        model: the network (a DDP/DataParallel wrapper is unwrapped).
        data: an iterable of batches on the model's device: tensors, ``(inputs, labels)``
            tuples, or dicts of keyword inputs (label keys dropped; see :func:`split_batch`).
        example_inputs: a batch for site discovery; default: the inputs of the first batch.
        max_batches: measure at most this many batches (``None``: all).
        mode: ``"exact"`` (integer counts over the whole pass) or ``"paper"`` (the reference
            scripts' per-batch entropies, constant channels of a batch left out, averaged).
        progress: show a progress bar over batches (rank 0 only).
        backend: force a backend for the counting ops (``None``: automatic).
        graph: a :class:`SiteGraph` from :func:`discover_sites` to reuse.
        stop: ``None`` (whole pass, or ``max_batches``) or ``"decided"``.
        max_flip: with ``stop="decided"``: the flip bound a zero-entropy site must reach.
        confidence: with ``stop="decided"``: the confidence of that bound.
        tol: with ``stop="decided"``: tolerance on non-zero layer entropies, in bits.
        min_batches: with ``stop="decided"``: never stop before this many batches.
        plan: with ``stop="decided"``: a callable ``plan(entropy, constant) -> {key: amount}``
            whose amounts must be known before the pass stops (``None``: entropies only).
        plan_tol: with ``plan``: the relative tolerance on every amount, in (0, 1] (``None``
            switches the plan rule off).

    Returns:
        :class:`EntropyStats` (``.batches`` used, ``.stopped_early``, per-site ``.samples``).

    Raises:
        ConfigError: an argument is out of range (the message names it).
        DataError: no batches, batches on another device, or batches the model rejects (the
            model's own exception is chained as ``__cause__``, its message kept).
        ModelError: the traced graph does not compute what ``model.forward`` computes on the
            first batch, and functional activations make hooks unable to see every site.
        NumericsError: NaN/Inf appeared in an activation (the message names the site).

    Example:
        >>> import torch, egp_fast
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> stats = egp_fast.measure_entropy(net, [torch.randn(16, 4)], progress=False)
        >>> list(stats.sites), stats.sites["1"].samples
        (['1'], 16)
    """
    _check_measure_args(mode, max_batches, stop, max_flip, confidence, tol, min_batches)
    plan, plan_tol = check_plan(plan, plan_tol)
    if data is None:
        raise DataError("data is None; pass an iterable of batches (a DataLoader, a list of tensors...)")
    model = unwrap_model(model)
    device = model_device(model)
    start = time.perf_counter()
    try:
        iterator = iter(data)
    except TypeError:
        raise DataError(
            f"data has type {type(data).__name__}, which is not iterable; pass an iterable of "
            "batches (a DataLoader, a list of tensors...)"
        ) from None
    try:
        first = next(iterator)
    except StopIteration:
        raise DataError("data yielded no batches; measuring entropy needs at least one batch") from None
    # Before tracing on it: a batch on the wrong device deserves this message, not a trace error.
    _check_device(*split_batch(first), device, 0)
    if example_inputs is None:
        a, k = split_batch(first)
        example_inputs = k if k else (a[0] if len(a) == 1 else a)
    if graph is None:
        graph = cached_graph(model, example_inputs)
    sites = graph.sites
    counter = _Counter(sites, device, paper=(mode == "paper"))
    counter.backend = backend_for("sign_count", backend)
    # Hooks on the real model whenever they can see every site; the traced graph only for
    # functional activations (checked against model.forward on the first batch).
    use_hooks = not graph.traced or all(s.module is not None for s in sites)
    hooks = runner = None
    total = None
    if hasattr(data, "__len__"):
        total = len(data)
        if max_batches is not None:
            total = min(total, max_batches)
    elif max_batches is not None:
        total = max_batches
    decider = None
    if stop == "decided":
        decider = Decider(
            counter, max_flip=max_flip, confidence=confidence, tol=tol, min_batches=min_batches,
            used=[bool(s.producers) for s in sites], plan=plan, plan_tol=plan_tol, total=total,
        )
    bar = None
    nonfinite = torch.zeros((), dtype=torch.float64, device=device)  # finite iff outputs were
    stopped_early = False
    try:
        if use_hooks:
            hooks = _HookRecorder(model, list(enumerate(sites)), counter, fuse_relu=True)
        else:
            runner = _cached_instrument(graph, counter)
        bar = _progress(total, progress, "measuring entropy")
        with eval_mode(model):
            index = 0
            batch = first
            while True:
                args, kwargs = split_batch(batch)
                _check_device(args, kwargs, device, index)
                counter.current_n = batch_size(args, kwargs)
                if hooks is not None:
                    hooks.reset()
                    out = _run_model(model, args, kwargs, index)
                    hooks.check(index)
                else:
                    if index == 0:
                        real = _run_model(model, args, kwargs, index)
                    out = _run_traced(runner, graph, model, args, kwargs, index)
                    if index == 0:
                        _verify(model, graph, real, out)
                        del real
                for t in _tensors(out):
                    if t.is_floating_point():
                        nonfinite += _finite_probe(t)
                counter.batches += 1
                counter.total_samples += counter.current_n
                index += 1
                if bar is not None:
                    bar.update(1)
                if max_batches is not None and index >= max_batches:
                    break
                if decider is not None:
                    decider.after_batch(index - 1)
                    if decider.should_check(index) and decider.decided(index, _sum_across_ranks):
                        # decided on the data's last batch is not "early"
                        stopped_early = total is None or index < total
                        break
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
    finally:
        if hooks is not None:
            hooks.remove()
        if runner is not None:
            runner._egp_recorder.counter = None  # the cached module keeps no counts alive
        if bar is not None:
            bar.close()
    _all_reduce(counter)
    if not math.isfinite(float(nonfinite)):  # the one host sync of the pass (besides the end)
        raise NumericsError(_locate_nonfinite(model, data, graph, max_batches))
    stats = _finish(sites, counter, mode, backend, time.perf_counter() - start)
    stats.stopped_early = stopped_early
    return stats


# --------------------------------------------------------------------------------------------
# Running the model and checking what it computed.


def _finite_probe(t: torch.Tensor) -> torch.Tensor:
    """A float64 0-d tensor that is finite iff every entry of ``t`` is, from one reduction and
    no host sync: NaN and Inf propagate through a sum, and a float64 sum of values below 2^128
    in magnitude (every float dtype but float64) cannot overflow. float64 is checked entry by
    entry. Cheaper than ``isfinite().any()`` on the outputs of every batch."""
    if t.dtype == torch.float64:
        return torch.where(torch.isfinite(t).all(), 0.0, math.nan).to(torch.float64)
    return t.sum(dtype=torch.float64)


def _run_model(model: nn.Module, args: tuple, kwargs: dict, index: int) -> Any:
    try:
        return model(*args, **kwargs)
    except EGPError:  # ours already says what is wrong (bad backend, bad layout...)
        raise
    except Exception as e:
        raise DataError(
            f"the model failed on batch {index} ({describe_inputs(args, kwargs)}): {type(e).__name__}: {e}"
        ) from e


def _run_traced(runner, graph: SiteGraph, model: nn.Module, args: tuple, kwargs: dict, index: int) -> Any:
    try:
        return runner(*_bind(graph, model, args, kwargs))
    except EGPError:
        raise
    except Exception as e:
        if index == 0:  # model.forward just ran this batch without error: the trace is at fault
            raise ModelError(
                f"the fx-traced graph of {type(model).__name__} failed on batch 0 where "
                f"model.forward did not ({type(e).__name__}: {e}); its functional activations "
                f"({_functional_names(graph)}) can only be measured through the trace: make the "
                "forward traceable or use activation modules (nn.ReLU...)"
            ) from e
        raise DataError(
            f"the model failed on batch {index} ({describe_inputs(args, kwargs)}): {type(e).__name__}: {e}"
        ) from e


def _functional_names(graph: SiteGraph) -> str:
    names = [s.name for s in graph.sites if s.module is None]
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _verify(model: nn.Module, graph: SiteGraph, real: Any, traced: Any) -> None:
    why = _compare_outputs(real, traced)
    if why is not None:
        raise ModelError(
            f"the fx-traced graph of {type(model).__name__} does not compute what model.forward "
            f"computes on batch 0 ({why}): the forward has Python-side state or branches that "
            f"the trace froze. Its functional activations ({_functional_names(graph)}) cannot be "
            "seen by hooks, so it cannot be measured safely: make the forward deterministic and "
            "traceable, or use activation modules (nn.ReLU...) so hooks measure the real model"
        )


def _bind(graph: SiteGraph, model: nn.Module, args: tuple, kwargs: dict) -> list[Any]:
    if not kwargs:
        return list(args)
    values, _ = placeholder_args(model, graph.graph_module, args, kwargs)
    return values


# --------------------------------------------------------------------------------------------
# Locating a NaN/Inf (a second, checking pass).


class _Check:
    """A counter stand-in that only remembers the first site with a non-finite input."""

    def __init__(self, sites: list[Site]) -> None:
        self.sites = sites
        self.culprit: list[str] = []

    def record(self, index: int, z: torch.Tensor) -> None:
        if not self.culprit and not bool(torch.isfinite(z).all()):
            self.culprit.append(self.sites[index].name)


def _locate_nonfinite(model: nn.Module, data: Any, graph: SiteGraph, max_batches: int | None) -> str:
    """Find the first site whose pre-activation is not finite (a second, checking pass)."""
    generic = (
        "NaN or Inf appeared in the model's output during the entropy pass; check the inputs "
        "for NaN/Inf and the weights (e.g. a diverged fine-tune)"
    )
    if not _is_reiterable(data):
        return generic + " (the site could not be located: the data can only be iterated once)"
    check = _Check(graph.sites)
    hooks = gm = None
    if not graph.traced or all(s.module is not None for s in graph.sites):
        hooks = _HookRecorder(model, list(enumerate(graph.sites)), check)
    else:
        gm = _instrument(graph, check)
    try:
        with eval_mode(model):
            for i, batch in enumerate(data):
                if max_batches is not None and i >= max_batches:
                    break
                args, kwargs = split_batch(batch)
                if hooks is not None:
                    hooks.reset()
                    model(*args, **kwargs)
                else:
                    gm(*_bind(graph, model, args, kwargs))
                if check.culprit:
                    return (
                        f"NaN or Inf in the input of site {check.culprit[0]!r} (batch {i}); check "
                        "the data and the weights of the layers feeding that site"
                    )
    finally:
        if hooks is not None:
            hooks.remove()
    return generic


# --------------------------------------------------------------------------------------------
# Progress.


def _progress(total: int | None, enabled: bool, desc: str):
    return progress_bar(total=total, desc=desc, unit="batch", enabled=enabled and _is_rank0())


def _is_rank0() -> bool:
    d = torch.distributed
    return not (d.is_available() and d.is_initialized()) or d.get_rank() == 0


__all__ = ["measure_entropy"]
