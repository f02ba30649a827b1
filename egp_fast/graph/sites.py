"""Site records and what counts as an activation or a weight layer.

A *site* is one call of an activation (docs/algorithm.md, "Terms: sites, neurons, states,
producers"): a module called twice is two sites (``layer1.0.relu`` and ``layer1.0.relu:1``), and
functional calls (``F.relu``, ``torch.relu``, ``x.relu()``, ``F.gelu``...) are sites too. This
module holds the records (:class:`Site`, :class:`SiteGraph`), the weight layer types
(:data:`WEIGHT_TYPES`) and the tables that give a module, function or method call its site kind
and parameters; :mod:`egp_fast.graph.discovery` finds the sites of a model.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from egp_fast.graph.activations import ACTIVATION_KINDS, activation_info

# --------------------------------------------------------------------------------------------
# What counts as an activation and a weight layer.


class _HFConv1DMeta(type):
    def __instancecheck__(cls, obj: Any) -> bool:
        return _is_hf_conv1d(type(obj))

    def __subclasscheck__(cls, sub: type) -> bool:
        return isinstance(sub, type) and _is_hf_conv1d(sub)


@functools.cache
def _is_hf_conv1d(t: type) -> bool:
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers.") for c in t.__mro__)


class HFConv1D(metaclass=_HFConv1DMeta):
    """Stands for ``transformers``' ``Conv1D`` (GPT-2's linear layer, weight ``[in, out]``) in
    ``isinstance`` checks, without importing ``transformers``."""


WEIGHT_TYPES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, HFConv1D)


def module_kind(m: nn.Module) -> str | None:
    """The site kind of an activation module, or None (see :mod:`egp_fast.graph.activations`:
    torch.nn classes, then :func:`egp_fast.register_activation`, then probing)."""
    info = activation_info(m)
    return None if info is None else info[0]


FUNCTION_KINDS: dict[Any, str] = {
    F.relu: "relu",
    F.relu_: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    F.relu6: "relu6",
    F.hardtanh: "hardtanh",
    F.hardtanh_: "hardtanh",
    F.leaky_relu: "leaky_relu",
    F.leaky_relu_: "leaky_relu",
    F.prelu: "prelu",
    torch.prelu: "prelu",
    F.gelu: "gelu",
    F.silu: "silu",
}

METHOD_KINDS = {"relu": "relu", "relu_": "relu"}

SUPPORTED_ACTIVATIONS = ACTIVATION_KINDS


def module_params(kind: str, m: nn.Module) -> dict[str, Any]:
    info = activation_info(m)
    if info is None or info[0] != kind:
        return {}
    return dict(info[1])


def function_params(kind: str, node: fx.Node) -> dict[str, Any]:
    kw = dict(node.kwargs)
    args = list(node.args)
    if kind == "relu6":
        return {"min_val": 0.0, "max_val": 6.0}
    if kind == "hardtanh":
        lo = kw.get("min_val", args[1] if len(args) > 1 else -1.0)
        hi = kw.get("max_val", args[2] if len(args) > 2 else 1.0)
        return {"min_val": float(lo), "max_val": float(hi)}
    if kind == "leaky_relu":
        return {"negative_slope": float(kw.get("negative_slope", args[1] if len(args) > 1 else 0.01))}
    if kind == "gelu":
        return {"approximate": kw.get("approximate", "none")}
    return {}


def _breakpoints(kind: str, params: dict[str, Any]) -> tuple[float, ...]:
    if kind in ("relu6", "hardtanh"):
        return (params["min_val"], params["max_val"])
    return (0.0,)


# --------------------------------------------------------------------------------------------
# Public records.


@dataclass
class Site:
    """One activation call site.

    Attributes:
        name: stable name: the module's qualified name (``layer1.0.relu``), ``:k`` added for the
            k-th extra call of the same module, or the fx node name for a functional call.
        kind: ``relu``, ``relu6``, ``hardtanh``, ``leaky_relu``, ``prelu``, ``gelu`` or ``silu``.
        node: the fx node name (``""`` in the hooks fallback).
        module: qualified name of the activation module, or ``None`` for a functional call.
        producers: names of the weight layers (``model.named_modules()`` names) feeding the site.
        channel_dim: channel axis of the pre-activation (1 for ``[N, C, ...]``, -1 for tokens).
        channels: number of channels (neurons).
        breakpoints: where the activation changes piece (``(0.0,)`` for ReLU-like).
        params: activation parameters (slopes, clip values), JSON-safe.
        exact: False for smooth activations (GELU, SiLU): linearising them is approximate.
        shape: pre-activation shape on the example inputs.
    """

    name: str
    kind: str
    node: str
    module: str | None
    producers: list[str]
    channel_dim: int
    channels: int
    breakpoints: tuple[float, ...]
    params: dict[str, Any] = field(default_factory=dict)
    exact: bool = True
    shape: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "node": self.node,
            "module": self.module,
            "producers": list(self.producers),
            "channel_dim": self.channel_dim,
            "channels": self.channels,
            "breakpoints": list(self.breakpoints),
            "params": dict(self.params),
            "exact": self.exact,
            "shape": list(self.shape),
        }


class SiteGraph:
    """The sites of a model and, when tracing worked, its fx graph.

    ``graph_module`` shares every submodule and parameter with the model (it is a view of the
    same network, not a copy), so measuring through it measures the model. Discovery may hand
    over a traced graph whose GraphModule is not built yet (anything with a ``build()``); it is
    built the first time ``graph_module`` is read.
    """

    def __init__(
        self,
        sites: list[Site],
        graph_module: fx.GraphModule | None,
        arg_names: list[str],
    ) -> None:
        self.sites = sites
        self._graph_module = graph_module
        self.arg_names = arg_names
        self._by_name = {s.name: s for s in sites}

    @property
    def graph_module(self) -> fx.GraphModule | None:
        gm = self._graph_module
        if gm is not None and not isinstance(gm, fx.GraphModule):
            gm = self._graph_module = gm.build()
        return gm

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_graph_module"] = self.graph_module  # pickled as the GraphModule itself
        return state

    @property
    def traced(self) -> bool:
        return self._graph_module is not None

    def site(self, name: str) -> Site:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no site named {name!r}; sites are: {', '.join(self._by_name)}") from None

    def __iter__(self) -> Iterator[Site]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def producer_layers(self) -> list[str]:
        """Every producer layer, once, in site order."""
        seen: dict[str, None] = {}
        for s in self.sites:
            for p in s.producers:
                seen.setdefault(p, None)
        return list(seen)
