"""Recorders: where a measurement pass gets its counts from.

Sites that are modules are counted by :class:`_HookRecorder`, forward pre-hooks on the real
model's activation modules (the k-th call of a module in one forward is that module's k-th
site). In a measurement pass, a plain ``nn.ReLU`` instead gets its ``forward`` swapped for one
that applies the ReLU and counts in the same read of the input (:class:`_FusedReLU`, restored
by ``remove``); models with functional activations are measured through :func:`_instrument`, a copy of
the fx-traced graph with a recorder call before each activation node, cached on the
:class:`SiteGraph` by :func:`_cached_instrument`. Both hand each site's input to a target's
``record(index, z)``: a ``counting._Counter``, or any object with that method.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from egp_fast.errors import ModelError
from egp_fast.graph import Site, SiteGraph


class _Recorder(nn.Module):
    """Inserted before each activation node of the traced graph; records, returns nothing.

    ``counter`` is the target of the records (swapped between passes by
    :func:`_cached_instrument`).
    """

    def __init__(self, counter: Any) -> None:
        super().__init__()
        self.counter = counter

    def forward(self, index: int, z: torch.Tensor) -> None:
        self.counter.record(index, z)


def _cached_instrument(graph: SiteGraph, counter: Any) -> fx.GraphModule:
    """The instrumented module of ``graph``, built once and kept on it, now recording into
    ``counter``."""
    # Building the instrumented module costs time on every pass; a Pruner measures the same
    # graph every round, so keep it on the SiteGraph and swap the counter.
    gm = getattr(graph, "_egp_instrumented", None)
    if gm is None:
        gm = _instrument(graph, counter)
        graph._egp_instrumented = gm
    gm._egp_recorder.counter = counter
    return gm


def _instrument(graph: SiteGraph, counter: Any) -> fx.GraphModule:
    """A copy of ``graph``'s traced module that calls ``counter.record(site index, input)``
    before each activation node; it shares every parameter and buffer with the model."""
    gm = graph.graph_module
    new_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    index = {s.node: i for i, s in enumerate(graph.sites)}
    for node in gm.graph.nodes:
        if node.name in index:
            inp = node.args[0] if node.args else node.kwargs["input"]
            new_graph.call_module("_egp_recorder", (index[node.name], env[inp]))
        env[node] = new_graph.node_copy(node, lambda n: env[n])
    # GraphModule copies the attributes the graph references from `holder` by reference:
    # the instrumented module shares every parameter with the model.
    holder = nn.Module()
    for name, mod in gm.named_children():
        holder.add_module(name, mod)
    for name, _ in gm.named_parameters(recurse=False):
        setattr(holder, name, getattr(gm, name))
    for name, _ in gm.named_buffers(recurse=False):
        holder.register_buffer(name, getattr(gm, name))
    for node in gm.graph.nodes:
        if node.op == "get_attr" and "." not in node.target and not hasattr(holder, node.target):
            setattr(holder, node.target, getattr(gm, node.target))
    holder.add_module("_egp_recorder", _Recorder(counter))
    return fx.GraphModule(holder, new_graph, "EGPMeasure")


class _FusedReLU:
    """One ``nn.ReLU`` whose ``forward`` is swapped, for one pass, for the ReLU and its count in
    one read of the input (``counter.record_relu``); its calls are numbered like the hooks'.

    Only a module of exactly ``nn.ReLU`` type without a ``forward`` of its own is swapped, so
    ``remove`` (deleting the instance attribute) restores it exactly; hooks on the module still
    run around the swapped forward.
    """

    def __init__(self, module: nn.Module, name: str, idxs: list[int], recorder: _HookRecorder, counter: Any) -> None:
        inplace = bool(module.inplace)

        def forward(input: torch.Tensor) -> torch.Tensor:
            k = recorder.calls.get(name, 0)
            recorder.calls[name] = k + 1
            if k < len(idxs):
                return counter.record_relu(idxs[k], input, inplace)
            return torch.nn.functional.relu(input, inplace=inplace)

        self.module: nn.Module | None = module
        module.forward = forward

    @staticmethod
    def applies(module: nn.Module, sites: list[Site]) -> bool:
        return (
            type(module) is nn.ReLU
            and "forward" not in vars(module)
            and all(tuple(s.breakpoints) == (0.0,) for s in sites)
        )

    def remove(self) -> None:
        if self.module is not None:
            vars(self.module).pop("forward", None)
            self.module = None


class _HookRecorder:
    """Forward pre-hooks on the real model's activation modules; the k-th call of a module in
    one forward is that module's k-th site (the naming of :func:`discover_sites`).

    ``sites`` are ``(counter index, Site)`` pairs; sites without a module are skipped (the
    caller decides whether that is acceptable). With ``fuse_relu`` (``counter`` then has
    ``record_relu``), plain ``nn.ReLU`` modules are counted by :class:`_FusedReLU` instead of a
    hook.
    """

    def __init__(self, model: nn.Module, sites: list[tuple[int, Site]], counter: Any, fuse_relu: bool = False) -> None:
        self.handles = []
        by_module: dict[str, list[int]] = {}
        site_of = dict(sites)
        for i, s in sites:
            if s.module is not None:
                by_module.setdefault(s.module, []).append(i)
        self.expected = {name: len(idxs) for name, idxs in by_module.items()}
        self.calls: dict[str, int] = {}
        self.warned = False
        modules = dict(model.named_modules())
        try:
            for name, idxs in by_module.items():
                if name not in modules:
                    raise ModelError(
                        f"site module {name!r} is not a submodule of {type(model).__name__}; the "
                        "graph passed as `graph` belongs to another model (or the model changed): "
                        "pass graph=None to rediscover the sites"
                    )

                module = modules[name]
                if fuse_relu and _FusedReLU.applies(module, [site_of[i] for i in idxs]):
                    self.handles.append(_FusedReLU(module, name, idxs, self, counter))
                    continue

                def hook(mod, inp, name=name, idxs=idxs):
                    k = self.calls.get(name, 0)
                    self.calls[name] = k + 1
                    if k < len(idxs):
                        counter.record(idxs[k], inp[0])

                self.handles.append(module.register_forward_pre_hook(hook))
        except BaseException:
            self.remove()
            raise

    def reset(self) -> None:
        self.calls.clear()

    def check(self, index: int) -> None:
        """Warn (once) when a forward called an activation module a different number of times
        than on the example inputs: calls beyond the discovered ones are not counted."""
        if self.calls == self.expected or self.warned:
            return
        diff = [
            f"{n} ran {self.calls.get(n, 0)}x (example: {k}x)"
            for n, k in self.expected.items()
            if self.calls.get(n, 0) != k
        ]
        if diff:
            self.warned = True
            warnings.warn(
                f"egp_fast: batch {index} called activation modules a different number of times "
                f"than the example inputs did ({'; '.join(diff[:5])}); extra calls are not counted "
                "and sites that did not run saw no samples in that batch",
                stacklevel=4,
            )

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
