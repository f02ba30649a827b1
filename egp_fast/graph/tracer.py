"""The torch.fx tracer of site discovery: which modules stay leaves, and typed inputs.

Activation and weight modules are kept as leaves, so each is one graph node whose name is its
module's; :func:`egp_fast.graph.trace` builds on this tracer (and on its second mode, which
traces the root ``forward`` through a wrapper taking named keyword inputs).
"""

from __future__ import annotations

import types
import weakref
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from egp_fast.errors import DataError
from egp_fast.graph.sites import WEIGHT_TYPES, module_kind

class _Tracer(fx.Tracer):
    """Default leaves (torch.nn modules) plus activation modules defined outside torch.nn.

    With ``input_names`` the root ``forward`` is traced through a wrapper taking exactly those
    keyword inputs (fx cannot trace a root whose signature has ``**kwargs``, as every
    ``transformers`` model's does); the other inputs keep their defaults. ``opaque`` modules are
    kept as leaves too: the fallback for models whose own code fx cannot follow.
    """

    def __init__(
        self,
        input_names: list[str] | None = None,
        opaque: frozenset[nn.Module] = frozenset(),
        fixed: dict[str, Any] | None = None,
        autowrap_functions: tuple = (),
        kinds: dict[nn.Module, str | None] | None = None,
    ) -> None:
        super().__init__(autowrap_functions=autowrap_functions)
        # module -> site kind (None: not an activation) of every module of the model to trace,
        # decided once before tracing (see tracing._module_kinds)
        self._kinds = kinds
        self._input_names = input_names
        self._opaque = opaque
        self._fixed = fixed or {}
        self.output_types: list[type] = []
        self.object_paths: dict[int, str] = {}
        self.input_meta: dict[str, dict[str, Any]] | None = None

    def create_arg(self, a: Any) -> Any:
        # A library object the model holds (a transformers config) passed to a wrapped call: read
        # it from the module at run time. fx would rebuild it from its public fields and lose the
        # private ones (the config's attention implementation, which the mask builders read).
        path = self.object_paths.get(id(a)) if self.object_paths else None
        if path is not None:
            return self.create_node("get_attr", path, (), {})
        return super().create_arg(a)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        meta = self.input_meta.get(node.target) if node.op == "placeholder" and self.input_meta else None
        return _InputProxy(node, self, meta) if meta is not None else fx.Proxy(node, self)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        out = super().getattr(attr, attr_val, parameter_proxy_cache)
        if self.input_meta is not None and isinstance(out, fx.Proxy) and isinstance(attr_val, torch.Tensor):
            # A parameter's dtype, device and shape are fixed: let the model's code read them.
            meta = {"dtype": attr_val.dtype, "device": attr_val.device, "ndim": attr_val.dim(),
                    "shape": attr_val.shape}
            return _InputProxy(out.node, self, meta)
        return out

    def _installed_modules(self) -> set[nn.Module] | dict[nn.Module, str | None]:
        if self._kinds is not None:
            return self._kinds  # its keys are the root's modules
        installed = self.__dict__.get("_installed")
        if installed is None or installed[0] is not self.root:
            installed = self._installed = (self.root, set(self.root.modules()))
        return installed[1]

    def path_of_module(self, mod: nn.Module) -> str:
        if mod not in self._installed_modules():
            # A module object called but not installed (transformers' module-level `gelu`):
            # name its scope after the caller, so a functional site inside reads lm_head.GELUActivation.
            parent = self.scope.module_path
            return f"{parent}.{type(mod).__name__}" if parent else type(mod).__name__
        return super().path_of_module(mod)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if m not in self._installed_modules():
            # A module built during forward (transformers' ACT2FN[...] makes a new activation per
            # call): it has no name to be a leaf under, so fx traces into it (F.gelu is a site).
            return False
        kind = self._kinds[m] if self._kinds is not None else module_kind(m)
        if kind is not None or isinstance(m, WEIGHT_TYPES) or m in self._opaque:
            return True
        return super().is_leaf_module(m, qualname)

    def create_args_for_root(self, root_fn: Any, is_module: bool, concrete_args: Any = None) -> Any:
        if self._input_names is not None:
            root_fn = _explicit_forward(root_fn, self._input_names, self._fixed, self.output_types)
        return super().create_args_for_root(root_fn, is_module, concrete_args)


class _InputProxy(fx.Proxy):
    """An input whose dtype, device and number of dims are known from the example inputs.

    Models check ``pixel_values.dtype`` against their weights' before casting (ViT); those
    facts do not change between batches of one loader, so the trace may use them.
    """

    def __init__(self, node: fx.Node, tracer: fx.Tracer, meta: dict[str, Any]) -> None:
        super().__init__(node, tracer)
        self._egp_meta = meta

    def __getattr__(self, k: str) -> Any:
        meta = self.__dict__.get("_egp_meta")
        if meta is not None and k in meta:
            return meta[k]
        return super().__getattr__(k)

    def dim(self) -> int:
        return self._egp_meta["ndim"]


def _explicit_forward(fn: Any, names: list[str], fixed: dict[str, Any], seen: list[type]) -> Any:
    """``forward(self, <names>)`` calling ``fn(self, name=name..., **fixed)``.

    It is rebuilt on ``fn``'s globals, so fx's automatic wrapping of functions (the
    ``transformers`` mask builders) applies to the root model's code as well.
    """
    for n in names:
        if not n.isidentifier() or n == "self":
            raise DataError(f"model input name {n!r} is not a valid argument name")
    params = ", ".join(names)
    call = ", ".join([f"{n}={n}" for n in names] + [f"{k}=_fixed[{k!r}]" for k in fixed])
    src = (
        "def _make(_orig, _fixed, _seen):\n"
        f"    def forward(self, {params}):\n"
        f"        _out = _orig(self, {call})\n"
        "        _seen.append(type(_out))\n"
        "        return _out\n"
        "    return forward\n"
    )
    ns: dict[str, Any] = {}
    exec(compile(src, "<egp_fast.trace>", "exec"), ns)  # noqa: S102 - names checked above
    f = ns["_make"](fn, fixed, seen)
    return types.FunctionType(f.__code__, getattr(fn, "__globals__", {}), "forward", None, f.__closure__)


try:  # generates the Python code of forward on first use, not at construction: site
    # discovery and hook-based measurement never call the traced forward
    from torch.fx._lazy_graph_module import _LazyGraphModule as _GraphModuleClass
except ImportError:  # an older torch without it
    _GraphModuleClass = fx.GraphModule


def _graph_module(root: nn.Module | dict[str, Any], graph: fx.Graph, name: str) -> fx.GraphModule:
    return _GraphModuleClass(root, graph, name)


class _DeferredGraphModule:
    """A traced graph and its root, with the ``fx.GraphModule`` built on first use.

    Building a GraphModule copies the module tree along every path the graph names (about
    0.6 ms for resnet18), and measuring through hooks never needs it. Until then this offers
    what site discovery reads: ``graph``, and the root's submodules under the qualified names
    the graph uses (the same objects the GraphModule would hold). :class:`SiteGraph` builds it
    when ``graph_module`` is first read.

    The root is held weakly (discovery's cache must not keep a model alive), the objects the
    graph names strongly: once the model is gone, or when one of them was replaced in it since,
    ``build`` assembles the GraphModule from those objects, as building it at trace time would
    have.
    """

    def __init__(self, root: nn.Module, graph: fx.Graph, name: str) -> None:
        self._root = weakref.ref(root)
        self.graph = graph
        self.name = name
        self._targets: dict[str, Any] = {
            n.target: _lookup(root, n.target) for n in graph.nodes if n.op in ("call_module", "get_attr")
        }

    @property
    def root(self) -> nn.Module:
        root = self._root()
        if root is None:
            raise RuntimeError("the traced model no longer exists")
        return root

    def named_modules(self):
        return self.root.named_modules()

    def get_submodule(self, target: str) -> nn.Module:
        return self.root.get_submodule(target)

    def build(self) -> fx.GraphModule:
        root = self._root()
        if root is not None and all(_lookup(root, t) is obj for t, obj in self._targets.items()):
            return _graph_module(root, self.graph, self.name)
        # The model is gone, or a module of it was replaced since the trace (a linearised site):
        # the graph runs the objects it named then. Targets inside another target are reached
        # through it (assigning them would write into the model's own module).
        names = set(self._targets)
        own = {t: o for t, o in self._targets.items()
               if not any(t.startswith(p + ".") for p in names if p != t)}
        return _graph_module(own, self.graph, self.name)


def _lookup(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for atom in target.split("."):
        obj = getattr(obj, atom, None)
    return obj
