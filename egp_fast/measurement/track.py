"""Counting activation states during training forwards (``track_entropy``).

EASIER's scripts, and any schedule that cannot afford an extra measurement pass per round,
count signs while the model trains. :func:`track_entropy` does that with forward pre-hooks on
the model's activation modules: the user's forward, loss and optimizer are untouched, and the
counts land in the same device buffers as :func:`egp_fast.measure_entropy`'s.

Train-mode forwards are not eval-mode forwards: BatchNorm normalises with batch statistics,
dropout drops, augmentation changes the inputs, and the weights move between batches. The
statistics describe what the model did while it trained (see ``docs/confidence.md``).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from egp_fast.errors import ConfigError, DataError
from egp_fast.graph import SiteGraph, unwrap_model
from egp_fast.measurement.batches import batch_size, model_device
from egp_fast.measurement.counting import _all_reduce, _Counter, _finish
from egp_fast.measurement.discover import cached_graph
from egp_fast.measurement.recorders import _HookRecorder
from egp_fast.measurement.stats import EntropyStats
from egp_fast.ops import backend_for


class EntropyTracker:
    """Counts the activation states of a model's training forwards (see :func:`track_entropy`).

    Attributes:
        graph: the model's :class:`SiteGraph` (``None`` until the first forward when neither
            ``graph`` nor ``example_inputs`` was given).
        unmeasured: functional sites hooks cannot see (not in :meth:`stats`).
    """

    def __init__(
        self,
        model: nn.Module,
        graph: SiteGraph | None = None,
        example_inputs: Any = None,
        mode: str = "exact",
        *,
        training_only: bool = True,
        backend: str | None = None,
    ) -> None:
        if mode not in ("exact", "paper"):
            raise ConfigError(f"mode={mode!r} is not a measurement mode; use 'exact' or 'paper'")
        if graph is not None and not isinstance(graph, SiteGraph):
            raise ConfigError(f"graph must be a SiteGraph from egp_fast.discover_sites, got {type(graph).__name__}")
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = unwrap_model(model)
        self.mode = mode
        self.training_only = bool(training_only)
        self.backend = backend
        self.graph: SiteGraph | None = None
        self.unmeasured: list[str] = []
        self._counter: _Counter | None = None
        self._sites: list = []
        self._hooks = None
        self._root_handle = None
        self._active = False  # inside a counted forward
        self._discovering = False
        self._closed = False
        self._start = time.perf_counter()
        try:
            if graph is not None:
                self._install(graph)
            elif example_inputs is not None:
                self._install(cached_graph(self.model, example_inputs))
            self._root_handle = self.model.register_forward_pre_hook(self._on_forward, with_kwargs=True)
        except BaseException:
            self.close()
            raise

    # -- hooks ---------------------------------------------------------------------------

    def _install(self, graph: SiteGraph) -> None:
        self.graph = graph
        pairs = [(i, s) for i, s in enumerate(s for s in graph.sites if s.module is not None)]
        self._sites = [s for _, s in pairs]
        self.unmeasured = [s.name for s in graph.sites if s.module is None]
        if self.unmeasured:
            warnings.warn(
                f"egp_fast.measurement.track_entropy: {len(self.unmeasured)} site(s) are functional "
                f"activations ({', '.join(self.unmeasured[:5])}{'...' if len(self.unmeasured) > 5 else ''})"
                " that hooks cannot see; they are not counted while training and are listed in "
                "EntropyStats.unmeasured (measure them with egp_fast.measure_entropy)",
                stacklevel=4,
            )
        if not self._sites:
            return
        counter = _Counter(self._sites, model_device(self.model), paper=(self.mode == "paper"))
        counter.backend = backend_for("sign_count", self.backend)
        gate = _Gate(self, counter)
        self._hooks = _HookRecorder(self.model, pairs, gate)
        self._counter = counter

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._discovering or self._closed:
            return None
        self._active = module.training or not self.training_only
        if not self._active:
            return None
        if self.graph is None:
            self._discover(args, kwargs)
        if self._counter is None:
            return None
        if self._hooks is not None:
            self._hooks.reset()
        self._counter.current_n = batch_size(args, kwargs)
        self._counter.batches += 1
        self._counter.total_samples += self._counter.current_n
        return None

    def _discover(self, args: tuple, kwargs: dict) -> None:
        example = kwargs if kwargs else (args[0] if len(args) == 1 else args)
        example = _detached(example)
        self._discovering = True
        try:
            graph = cached_graph(self.model, example)
        finally:
            self._discovering = False
        self._install(graph)

    # -- results -------------------------------------------------------------------------

    @property
    def batches(self) -> int:
        """Training forwards counted so far."""
        return self._counter.batches if self._counter is not None else 0

    def stats(self) -> EntropyStats:
        """The statistics of the forwards counted so far, as :class:`EntropyStats`.

        Under ``torch.distributed`` the counts of all ranks are summed (on copies: counting
        goes on), so every rank gets the same statistics; every rank must call it.

        Returns:
            :class:`egp_fast.measurement.EntropyStats` over the hooked sites; functional sites are
            listed in ``.unmeasured``.

        Raises:
            DataError: no training forward was counted yet.
        """
        if self._counter is None or self._counter.batches == 0:
            if self.graph is not None and not self._sites:
                return EntropyStats({}, self.mode, 0, 0.0, unmeasured=list(self.unmeasured))
            raise DataError(
                "track_entropy has counted no forward yet: run training forwards "
                "(model.train(); model(x)) inside the `with` block before calling .stats()"
                + (" (eval-mode forwards are not counted; pass training_only=False to count them)"
                   if self.training_only else "")
            )
        counter = self._counter.snapshot()
        _all_reduce(counter)
        stats = _finish(self._sites, counter, self.mode, self.backend, time.perf_counter() - self._start)
        stats.unmeasured = list(self.unmeasured)
        return stats

    def close(self) -> None:
        """Remove every hook (idempotent)."""
        self._closed = True
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        if self._root_handle is not None:
            self._root_handle.remove()
            self._root_handle = None


class _Gate:
    """Passes a hook's record to the counter only inside a counted (training) forward."""

    def __init__(self, tracker: EntropyTracker, counter: Any) -> None:
        self.tracker = tracker
        self.counter = counter

    def record(self, i: int, z: torch.Tensor) -> None:
        if self.tracker._active:
            with torch.no_grad():
                self.counter.record(i, z)


def _detached(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, dict):
        return {k: _detached(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_detached(v) for v in x)
    return x


@contextlib.contextmanager
def track_entropy(
    model: nn.Module,
    graph: SiteGraph | None = None,
    example_inputs: Any = None,
    mode: str = "exact",
    *,
    training_only: bool = True,
    backend: str | None = None,
) -> Iterator[EntropyTracker]:
    """Count activation states during the training forwards run inside the ``with`` block.

    Forward pre-hooks on the activation modules count ``z > 0`` per channel (and the other
    breakpoints of multi-piece activations) in device buffers, as :func:`measure_entropy`
    does, but on the forwards the user's training loop runs anyway: a pruning round needs no
    extra measurement pass. The forward, the loss and the gradients are unchanged. Every hook
    is removed when the block exits, also on exceptions.

    Caveats: train-mode forwards use BatchNorm batch statistics, dropout and augmented inputs,
    and the weights change from batch to batch, so the statistics can differ from an
    eval-mode pass (``docs/confidence.md`` gives the agreement measured on digits). Functional
    activations (``F.relu`` in a forward) cannot be hooked: a warning names them and they are
    listed in ``EntropyStats.unmeasured``.

    Args:
        model: the network being trained (a DDP wrapper is unwrapped).
        graph: a :class:`SiteGraph` to reuse (e.g. ``Pruner.graph``).
        example_inputs: a batch for site discovery when ``graph`` is not given; default: the
            first forward's inputs (two samples of them).
        mode: ``"exact"`` or ``"paper"`` (per-forward values averaged, as in
            :func:`measure_entropy`).
        training_only: count only forwards with ``model.training`` True (default), so
            validation forwards inside the block are not counted.
        backend: force a backend for the counting op.

    Yields:
        An :class:`EntropyTracker`: ``.stats()`` -> :class:`EntropyStats`, ``.batches``.

    Raises:
        ConfigError: ``mode`` or ``graph`` is not usable.

    Example:
        >>> import torch, egp_fast
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> with egp_fast.measurement.track_entropy(net) as tracker:
        ...     for _ in range(3):
        ...         opt.zero_grad()
        ...         net(torch.randn(16, 4)).sum().backward()
        ...         opt.step()
        >>> stats = tracker.stats()
        >>> tracker.batches, stats.sites["1"].samples
        (3, 48)
    """
    tracker = EntropyTracker(
        model, graph, example_inputs, mode, training_only=training_only, backend=backend
    )
    try:
        yield tracker
    finally:
        tracker.close()
