"""Site discovery: every nonlinearity call in the forward pass, its producers and channel axis.

A *site* is one call of an activation (docs/algorithm.md, "Terms"): a module called twice is two sites
(``layer1.0.relu`` and ``layer1.0.relu:1``), and functional calls (``F.relu``, ``torch.relu``,
``x.relu()``, ``F.gelu``...) are sites too. The model is traced with ``torch.fx``; when that
fails the module hooks fallback sees module activations only (with a warning).

The *producers* of a site are the weight layers (Conv/Linear) whose output feeds it, found by
walking back through normalisation, dropout, scalar arithmetic, reshapes, pooling and
residual adds; at an add, the branch with more weight layers since the fork point wins (the
residual branch of a ResNet block, not its identity or downsample shortcut).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect as _inspect
import io
import operator
import sys
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from egp_fast.graph.activations import ACTIVATION_KINDS, activation_info
from egp_fast.errors import DataError, ModelError

# --------------------------------------------------------------------------------------------
# What counts as an activation, a weight layer, and a transparent step between them.

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
# Layers that act on the last dim of a [..., C] input, like nn.Linear (token features).
_LINEAR_LIKE: tuple[type, ...] = (nn.Linear, HFConv1D)

_TRANSPARENT_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.Upsample,
)

_TRANSPARENT_FUNCTIONS = {
    F.batch_norm,
    F.layer_norm,
    F.group_norm,
    F.dropout,
    F.avg_pool2d,
    F.max_pool2d,
    F.adaptive_avg_pool2d,
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.squeeze,
    torch.unsqueeze,
    operator.mul,
    operator.truediv,
    operator.neg,
    torch.mul,
    torch.div,
    operator.getitem,
}

_TRANSPARENT_METHODS = {
    "view",
    "reshape",
    "permute",
    "transpose",
    "flatten",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "mul",
    "div",
    "to",
    "float",
    "half",
    "bfloat16",
    "type_as",
    "__getitem__",
}

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_CAT_FUNCTIONS = {torch.cat, torch.concat}


def module_kind(m: nn.Module) -> str | None:
    """The site kind of an activation module, or None (see :mod:`egp_fast.activations`:
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
    same network, not a copy), so measuring through it measures the model.
    """

    def __init__(
        self,
        sites: list[Site],
        graph_module: fx.GraphModule | None,
        arg_names: list[str],
    ) -> None:
        self.sites = sites
        self.graph_module = graph_module
        self.arg_names = arg_names
        self._by_name = {s.name: s for s in sites}

    @property
    def traced(self) -> bool:
        return self.graph_module is not None

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


# --------------------------------------------------------------------------------------------
# Inputs.


# Keys of a dict batch that hold targets, never model inputs.
LABEL_KEYS = ("label", "labels", "target", "targets", "y")


def normalize_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` from a tensor, a tuple/list of positional args, or a dict of kwargs.

    Label keys of a dict (``label``, ``labels``, ``target``, ``targets``, ``y``) are dropped, as
    :func:`egp_fast.measurement.split_batch` drops them from data batches: a batch of a Hugging Face
    loader can serve as example inputs, and the traced model does not require labels.
    """
    if example_inputs is None:
        raise DataError(
            "example_inputs is None; pass a batch the model accepts (a tensor, a tuple of "
            "positional inputs, or a dict of keyword inputs)"
        )
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), {k: v for k, v in example_inputs.items() if k not in LABEL_KEYS}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise DataError(
        f"example_inputs has type {type(example_inputs).__name__}; pass a tensor, a tuple of "
        "positional inputs, or a dict of keyword inputs"
    )


def placeholder_args(
    model: nn.Module, gm: fx.GraphModule, args: tuple, kwargs: dict
) -> tuple[list[Any], list[str]]:
    """Positional values for the graph's placeholders, binding kwargs by name."""
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    if not kwargs:
        return list(args), names
    sig = _inspect.signature(model.forward)
    bound = sig.bind_partial(*args, **kwargs)
    bound.apply_defaults()
    values = []
    for n in names:
        key = n.lstrip("*")
        if key not in bound.arguments:
            raise DataError(f"example_inputs gives no value for the model input {key!r}")
        values.append(bound.arguments[key])
    return values, names


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no_grad inside; every module's own training flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        if any(t for _, t in flags):  # already in eval mode: nothing to switch (or to restore)
            model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, t in flags:
            if m.training != t:  # nn.Module.__setattr__ is slow: touch only what changed
                m.training = t


# --------------------------------------------------------------------------------------------
# Tracing.


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
    ) -> None:
        super().__init__(autowrap_functions=autowrap_functions)
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

    def _installed_modules(self) -> set[nn.Module]:
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
        if module_kind(m) is not None or isinstance(m, WEIGHT_TYPES) or m in self._opaque:
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


def _rebuild_output(module: str, qualname: str, value: Any) -> Any:
    """Turn the plain dict fx records for a ``transformers`` ``ModelOutput`` back into one.

    The class travels by name (strings survive fx's code generation and ``torch.load``).
    """
    cls: Any = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    return cls(**value)


fx.wrap("_rebuild_output")


def _root_takes_varargs(model: nn.Module) -> bool:
    try:
        sig = _inspect.signature(type(model).forward)
    except (TypeError, ValueError):
        return False
    return any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in sig.parameters.values())


def _is_transformers_model(model: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def _named_inputs(model: nn.Module, example_inputs: Any) -> dict[str, Any]:
    if example_inputs is None:
        return {}
    try:
        args, kwargs = normalize_inputs(example_inputs)
    except DataError:
        return {}
    names = _input_names(model, args, kwargs) or []
    values = list(args) + [kwargs[k] for k in names[len(args):]]
    return dict(zip(names, values))


def _default_input_names(model: nn.Module) -> list[str]:
    main = getattr(model, "main_input_name", None)
    if isinstance(main, str):
        return [main]
    try:
        sig = _inspect.signature(model.forward)
    except (TypeError, ValueError):
        return []
    return [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:1]


def _hf_autowrap() -> tuple:
    # transformers' attention-mask builders branch on their inputs (fx cannot follow them);
    # each becomes one call node. Only looked up when transformers is already imported.
    mu = sys.modules.get("transformers.masking_utils")
    if mu is None:
        return ()
    names = ("create_causal_mask", "create_bidirectional_mask", "create_sliding_window_causal_mask",
             "create_chunked_causal_mask", "create_masks_for_generate")
    return tuple(getattr(mu, n) for n in names if callable(getattr(mu, n, None)))


try:  # generates the Python code of forward on first use, not at construction (~2.5 ms on
    # resnet18): site discovery and hook-based measurement never call the traced forward
    from torch.fx._lazy_graph_module import _LazyGraphModule as _GraphModuleClass
except ImportError:  # an older torch without it
    _GraphModuleClass = fx.GraphModule


def _graph_module(root: nn.Module, graph: fx.Graph, name: str) -> fx.GraphModule:
    return _GraphModuleClass(root, graph, name)


def trace(model: nn.Module, input_names: list[str] | None = None, example_inputs: Any = None) -> fx.GraphModule:
    """Symbolically trace ``model`` with torch.fx, activation and weight modules kept as leaves.

    The result shares the model's submodules and parameters (no copy). Use it as the model
    when a functional activation in the root ``forward`` must be linearised in place.

    When plain tracing fails, a second tracer is tried that (1) traces the root ``forward``
    through a wrapper taking just ``input_names`` as keyword inputs (the others keep their
    defaults; ``use_cache`` is set to False), (2) keeps every submodule that contains no
    activation as a leaf (attention, embeddings, norms) and (3) records the ``transformers``
    mask builders as single calls. This is what traces Hugging Face ``transformers`` models
    (BERT, ViT, GPT-2, LLaMA...); ``ModelOutput`` results are rebuilt, so
    ``traced(**inputs).logits`` works. The traced module then takes exactly those inputs.

    Args:
        model: the network; its forward must be traceable (no data-dependent control flow
            outside the leaves).
        input_names: the keyword inputs the traced module takes, for the second tracer
            (default: the model's ``main_input_name``, e.g. ``input_ids``, or its first
            positional argument). :func:`discover_sites` passes the keys of the example inputs.
        example_inputs: optional batch (tensor, tuple or dict); the second tracer reads the
            dtype, device and number of dims of each input from it (and nothing else: batch
            size and sequence length stay free). Its keys give ``input_names`` when that is None.

    Returns:
        An ``fx.GraphModule`` computing the same function.

    Raises:
        Whatever torch.fx raised on the first attempt, when the second one fails too.

    Example:
        >>> import torch, egp_fast
        >>> gm = egp_fast.trace(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
        >>> isinstance(gm, torch.fx.GraphModule)
        True
    """
    # Decide every module's kind now: probing inside the tracer would run under fx's patches.
    activation_modules = [m for m in model.modules() if module_kind(m) is not None]
    name = model.__class__.__name__
    try:
        tracer = _Tracer()
        graph = tracer.trace(model)
        return _graph_module(tracer.root, graph, name)
    except Exception as first:
        hf = any(_is_transformers_model(m) for m in model.modules())
        if not (hf or input_names is not None or _root_takes_varargs(model)):
            raise
        try:
            return _trace_opaque(model, input_names, activation_modules, hf, _named_inputs(model, example_inputs))
        except Exception:
            raise first from None


def _failing_module(tb: Any) -> nn.Module | None:
    """The innermost module whose call was being traced when fx failed (from the traceback)."""
    found = None
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "module_call_wrapper":
            m = tb.tb_frame.f_locals.get("mod")
            if isinstance(m, nn.Module):
                found = m
        tb = tb.tb_next
    return found


@contextlib.contextmanager
def _wrap_calls(tracer: fx.Tracer, modules: set[nn.Module], functions: tuple) -> Iterator[None]:
    """Inside the traced modules' source modules, make ``functions`` record one call node.

    fx's own automatic wrapping looks at the globals of ``forward``, which for a decorated
    ``transformers`` forward are the decorator's module, not the model's: patch the globals of
    the undecorated functions instead (restored on exit).
    """
    if not functions:
        yield
        return
    targets = {id(f): f for f in functions}

    def wrapped(orig: Any) -> Any:
        @functools.wraps(orig)
        def call(*args: Any, **kwargs: Any) -> Any:
            leaves = list(args) + list(kwargs.values())
            if any(isinstance(v, fx.Proxy) for v in leaves):
                proxy = tracer.create_proxy("call_function", orig, args, kwargs)
                proxy.node.meta["is_wrapped"] = True  # codegen re-wraps it (torch.load re-traces)
                return proxy
            return orig(*args, **kwargs)

        return call

    patched: list[tuple[dict, str, Any]] = []
    seen: set[int] = set()
    try:
        for m in modules:
            fn = _inspect.unwrap(getattr(type(m), "forward", None) or (lambda: None))
            g = getattr(fn, "__globals__", None)
            if g is None or id(g) in seen:
                continue
            seen.add(id(g))
            for k, v in list(g.items()):
                if id(v) in targets:
                    patched.append((g, k, v))
                    g[k] = wrapped(v)
        yield
    finally:
        for g, k, v in reversed(patched):
            g[k] = v


class _BoundCall(nn.Module):
    """``fn(*args, **kwargs)`` with some arguments fixed to objects the model holds (its config).

    A call node cannot hold such an object as a constant (fx would rebuild a config from its
    public fields, and lose the attention implementation), and a ``get_attr`` of it does not
    survive ``torch.load``, which re-traces the code; a module holding it does.
    """

    _egp_not_activation = True  # never probed as an activation

    def __init__(self, fn: Any, fixed_args: dict[int, Any], fixed_kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.fn = fn
        self.fixed_args = fixed_args
        self.fixed_kwargs = fixed_kwargs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        full = list(args)
        for i in sorted(self.fixed_args):
            full.insert(i, self.fixed_args[i])
        return self.fn(*full, **kwargs, **self.fixed_kwargs)

    def extra_repr(self) -> str:
        return f"fn={getattr(self.fn, '__qualname__', self.fn)!r}"


def _bind_library_objects(gm: fx.GraphModule, paths: set[str]) -> None:
    """Turn calls that take a library object (``get_attr`` of a config) into :class:`_BoundCall`s."""
    if not paths:
        return
    g = gm.graph
    changed = False
    for node in list(g.nodes):
        if node.op != "call_function":
            continue

        def held(a: Any) -> bool:
            return isinstance(a, fx.Node) and a.op == "get_attr" and a.target in paths

        if not any(held(a) for a in list(node.args) + list(node.kwargs.values())):
            continue
        fixed_args = {i: _attr(gm, a.target) for i, a in enumerate(node.args) if held(a)}
        fixed_kwargs = {k: _attr(gm, a.target) for k, a in node.kwargs.items() if held(a)}
        name = f"_egp_call{sum(1 for n, _ in gm.named_children() if n.startswith('_egp_call'))}"
        gm.add_submodule(name, _BoundCall(node.target, fixed_args, fixed_kwargs))
        with g.inserting_before(node):
            new = g.call_module(
                name,
                tuple(a for a in node.args if not held(a)),
                {k: a for k, a in node.kwargs.items() if not held(a)},
            )
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        changed = True
    if changed:
        for node in list(g.nodes):
            if node.op == "get_attr" and node.target in paths and not node.users:
                g.erase_node(node)
        g.lint()
        gm.recompile()


def _attr(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _library_objects(model: nn.Module) -> dict[int, str]:
    """id -> attribute path of the transformers objects (configs) the model's modules hold."""
    paths: dict[int, str] = {}
    for name, mod in model.named_modules():
        for k, v in vars(mod).items():
            if k.startswith("_") or isinstance(v, (nn.Module, torch.Tensor)):
                continue
            if type(v).__module__.startswith("transformers."):
                paths.setdefault(id(v), f"{name}.{k}" if name else k)
    return paths


def _trace_opaque(
    model: nn.Module,
    input_names: list[str] | None,
    activation_modules: list[nn.Module],
    hf: bool,
    example_inputs: dict[str, Any] | None,
) -> fx.GraphModule:
    if input_names is None and example_inputs:
        input_names = list(example_inputs)
    if input_names is not None:
        names: list[str] | None = list(input_names)
    elif _root_takes_varargs(model):
        names = _default_input_names(model)
    else:
        names = None  # a plain signature (a GraphModule traced earlier): trace it as it is
    acts = set(activation_modules)
    # Modules on the way to an activation are traced through; every other one is a leaf.
    through: set[nn.Module] = set()
    for m in model.modules():
        if any(x in acts for x in m.modules()):
            through.add(m)
    fixed: dict[str, Any] = {}
    try:
        params = _inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        params = {}
    if hf and names is not None and "use_cache" in params and "use_cache" not in names:
        fixed["use_cache"] = False  # a KV cache object cannot flow through a graph
    autowrap = _hf_autowrap() if hf else ()
    meta = {
        k: {"dtype": v.dtype, "device": v.device, "ndim": v.dim()}
        for k, v in (example_inputs or {}).items()
        if isinstance(v, torch.Tensor)
    }
    # Trace; when fx fails inside a submodule that holds no activation (attention, embeddings),
    # make that module (and every module of its class) a leaf and try again. Everything else
    # stays traced through, so the weight layers next to the activations are graph nodes.
    opaque: set[nn.Module] = set()
    while True:
        tracer = _Tracer(names, frozenset(opaque), fixed, autowrap)
        tracer.object_paths = _library_objects(model) if hf else {}
        tracer.input_meta = meta
        try:
            with warnings.catch_warnings(), _wrap_calls(tracer, through, autowrap):
                warnings.simplefilter("ignore")
                graph = tracer.trace(model)
            break
        except Exception as e:
            bad = _failing_module(e.__traceback__)
            if bad is None or bad in through or bad in opaque:
                raise
            new = {m for m in model.modules() if type(m) is type(bad) and m not in through} - opaque
            if not new:
                raise  # nothing left to make a leaf: give up rather than loop
            opaque.update(new)
    gm = _graph_module(tracer.root, graph, model.__class__.__name__)
    _bind_library_objects(gm, set(tracer.object_paths.values()))
    out_types = tracer.output_types
    cls = out_types[-1] if out_types else dict
    if issubclass(cls, dict) and cls is not dict:
        # fx records a ModelOutput as a plain dict: rebuild the class from its name.
        out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        with gm.graph.inserting_before(out):
            rebuilt = gm.graph.call_function(_rebuild_output, (cls.__module__, cls.__qualname__, out.args[0]))
        rebuilt.meta["is_wrapped"] = True  # kept as one call when torch.load re-traces the code
        out.args = (rebuilt,)
        gm.recompile()
    return gm


class _ShapeRecorder(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            n.meta["egp_shape"] = tuple(out.shape)
        return out


def propagate_shapes(model: nn.Module, gm: fx.GraphModule, args: tuple, kwargs: dict) -> None:
    values, _ = placeholder_args(model, gm, args, kwargs)
    with eval_mode(model):
        try:
            _ShapeRecorder(gm).run(*values)
        except Exception as e:  # the model rejected the example inputs
            raise DataError(
                f"the model failed on example_inputs ({describe_inputs(args, kwargs)}): "
                f"{type(e).__name__}: {e}"
            ) from e


def describe_inputs(args: tuple, kwargs: dict) -> str:
    def one(v: Any) -> str:
        return f"tensor{list(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return ", ".join(parts) or "no inputs"


# --------------------------------------------------------------------------------------------
# Producer walk.


class _Walker:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self._anc: dict[fx.Node, frozenset[fx.Node]] = {}

    def _is_weight(self, n: fx.Node) -> bool:
        return n.op == "call_module" and isinstance(self.modules.get(n.target), WEIGHT_TYPES)

    def _first_tensor_arg(self, n: fx.Node) -> fx.Node | None:
        for a in list(n.args) + list(n.kwargs.values()):
            if isinstance(a, fx.Node):
                return a
        return None

    def ancestors(self, n: fx.Node) -> frozenset[fx.Node]:
        # Iterative to survive deep graphs (ViT-H has thousands of nodes).
        if n in self._anc:
            return self._anc[n]
        stack = [n]
        while stack:
            cur = stack[-1]
            if cur in self._anc:
                stack.pop()
                continue
            pending = [p for p in cur.all_input_nodes if p not in self._anc]
            if pending:
                stack.extend(pending)
                continue
            acc = {cur}
            for p in cur.all_input_nodes:
                acc |= self._anc[p]
            self._anc[cur] = frozenset(acc)
            stack.pop()
        return self._anc[n]

    def _weight_depth(self, n: fx.Node, stop: frozenset[fx.Node]) -> int:
        """Most weight layers on a path from the nodes in ``stop`` to ``n`` (exclusive)."""
        memo: dict[fx.Node, int] = {}
        order = [x for x in self.gm.graph.nodes if x in self.ancestors(n) and x not in stop]
        for x in order:
            best = 0
            for p in x.all_input_nodes:
                if p in memo:
                    best = max(best, memo[p])
            memo[x] = best + (1 if self._is_weight(x) else 0)
        return memo.get(n, 0)

    def producers(self, n: fx.Node) -> list[str]:
        seen: set[fx.Node] = set()
        return list(dict.fromkeys(self._walk(n, seen)))

    def _walk(self, n: fx.Node, seen: set[fx.Node]) -> list[str]:
        if n in seen:
            return []
        seen.add(n)
        if n.op == "call_module":
            m = self.modules.get(n.target)
            if isinstance(m, WEIGHT_TYPES):
                return [n.target]
            if isinstance(m, _TRANSPARENT_MODULES):
                a = self._first_tensor_arg(n)
                return self._walk(a, seen) if a is not None else []
            return []
        if n.op == "call_function":
            if n.target in _ADD_FUNCTIONS or (n.target is operator.sub):
                return self._walk_add(n, seen)
            if n.target in _CAT_FUNCTIONS:
                tensors = n.args[0] if n.args else n.kwargs.get("tensors", [])
                out: list[str] = []
                for t in tensors:
                    if isinstance(t, fx.Node):
                        out += self._walk(t, seen)
                return out
            if n.target in _TRANSPARENT_FUNCTIONS:
                a = self._first_tensor_arg(n)
                return self._walk(a, seen) if a is not None else []
            return []
        if n.op == "call_method":
            if n.target in ("add", "add_", "sub", "sub_"):
                return self._walk_add(n, seen)
            if n.target in _TRANSPARENT_METHODS:
                return self._walk(n.args[0], seen) if isinstance(n.args[0], fx.Node) else []
            return []
        return []

    def _walk_add(self, n: fx.Node, seen: set[fx.Node]) -> list[str]:
        branches = [a for a in n.args[:2] if isinstance(a, fx.Node)]
        if len(branches) < 2:
            return self._walk(branches[0], seen) if branches else []
        a, b = branches
        common = self.ancestors(a) & self.ancestors(b)
        da, db = self._weight_depth(a, common), self._weight_depth(b, common)
        if da > db:
            return self._walk(a, seen)
        if db > da:
            return self._walk(b, seen)
        return self._walk(a, seen) + self._walk(b, seen)


def _channel_dim(shape: tuple[int, ...], producer_modules: list[nn.Module]) -> int:
    if len(shape) <= 2:
        return -1 if len(shape) == 1 else 1
    if producer_modules and all(isinstance(m, _LINEAR_LIKE) for m in producer_modules):
        return -1  # token features [N, L, C] / [N, H, W, C]
    if producer_modules:
        return 1
    return -1 if len(shape) == 3 else 1


# --------------------------------------------------------------------------------------------
# Discovery.


def functional_site_name(node: fx.Node, owner_counts: dict[str, int]) -> str:
    # A thin activation wrapper (timm's GELU module calls F.gelu) is named after the module,
    # so names stay readable and stable; anything else keeps the fx node name.
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        owner_path, owner_type = list(stack.values())[-1]
        owner_type = owner_type if isinstance(owner_type, type) else type(owner_type)
        if any(k in owner_type.__name__.lower() for k in ("relu", "gelu", "silu", "swish", "act")):
            k = owner_counts.get(owner_path, 0)
            owner_counts[owner_path] = k + 1
            return owner_path if k == 0 else f"{owner_path}:{k}"
    return node.name


def discover_sites(model: nn.Module, example_inputs: Any) -> SiteGraph:
    """Find every activation site of ``model`` on ``example_inputs``.

    Args:
        model: any ``nn.Module`` (torchvision, timm, your own). It is run once in eval mode
            under no_grad; its training flags are restored.
        example_inputs: a batch the model accepts: a tensor, a tuple of positional inputs or
            a dict of keyword inputs, on the model's device.

    Returns:
        A :class:`SiteGraph` with the sites in execution order.

    Raises:
        ModelError: the model has no supported activation.
        DataError: the model rejects ``example_inputs``.

    Example:
        >>> import torch, torchvision, egp_fast
        >>> g = egp_fast.discover_sites(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))
        >>> len(g.sites), g.sites[1].name, g.sites[1].producers
        (17, 'layer1.0.relu', ['layer1.0.conv1'])
    """
    return discover_sites_sampled(model, example_inputs)


def discover_sites_sampled(model: nn.Module, example_inputs: Any, shape_inputs: Any = None) -> SiteGraph:
    """:func:`discover_sites`, with the forward that records shapes optionally run on other
    inputs: ``shape_inputs(gm)`` gets the traced graph (``None`` when tracing failed and hooks
    take over) and returns the batch to run (e.g. fewer samples, when ``gm`` allows it)."""
    model = unwrap_model(model)
    args, kwargs = normalize_inputs(example_inputs)
    try:
        gm = trace(model, _input_names(model, args, kwargs), example_inputs)
    except Exception as e:  # fx cannot follow data-dependent control flow and friends
        warnings.warn(
            f"egp_fast: torch.fx could not trace {type(model).__name__} ({type(e).__name__}: "
            f"{str(e)[:200]}); falling back to module hooks: functional activations (F.relu, "
            "x.relu()) are not seen and producers are inferred from execution order",
            stacklevel=3,
        )
        if shape_inputs is not None:
            args, kwargs = normalize_inputs(shape_inputs(None))
        return _discover_with_hooks(model, args, kwargs)
    if shape_inputs is not None:
        args, kwargs = normalize_inputs(shape_inputs(gm))
    propagate_shapes(model, gm, args, kwargs)
    modules = dict(gm.named_modules())
    walker = _Walker(gm)
    sites: list[Site] = []
    module_calls: dict[str, int] = {}
    owner_counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        kind = None
        params: dict[str, Any] = {}
        module_name = None
        if node.op == "call_module":
            m = modules.get(node.target)
            kind = module_kind(m) if m is not None else None
            if kind:
                params = module_params(kind, m)
                module_name = node.target
        elif node.op == "call_function" and node.target in FUNCTION_KINDS:
            kind = FUNCTION_KINDS[node.target]
            params = function_params(kind, node)
        elif node.op == "call_method" and node.target in METHOD_KINDS:
            kind = METHOD_KINDS[node.target]
        if kind is None:
            continue
        inp = node.args[0] if node.args else node.kwargs.get("input")
        if not isinstance(inp, fx.Node) or "egp_shape" not in inp.meta:
            continue  # activation of a constant or a non-tensor: nothing to measure
        shape = inp.meta["egp_shape"]
        if module_name is not None:
            k = module_calls.get(module_name, 0)
            module_calls[module_name] = k + 1
            name = module_name if k == 0 else f"{module_name}:{k}"
        else:
            name = functional_site_name(node, owner_counts)
        producers = walker.producers(inp)
        cdim = _channel_dim(shape, [modules[p] for p in producers])
        if kind == "prelu":
            pm = modules.get(module_name) if module_name else None
            if pm is not None and pm.weight.numel() > 1:
                cdim = 1  # PReLU's per-channel slopes act on dim 1
        channels = shape[cdim] if shape else 1
        sites.append(
            Site(
                name=name,
                kind=kind,
                node=node.name,
                module=module_name,
                producers=producers,
                channel_dim=cdim,
                channels=int(channels),
                breakpoints=_breakpoints(kind, params),
                params=params,
                exact=kind not in ("gelu", "silu"),
                shape=tuple(int(s) for s in shape),
            )
        )
    if not sites:
        raise ModelError(
            f"{type(model).__name__} has no supported activation ({', '.join(SUPPORTED_ACTIVATIONS)}); "
            "EGP measures the entropy of rectifier-like activations, so there is nothing to prune by"
        )
    _, arg_names = placeholder_args(model, gm, args, kwargs)
    return SiteGraph(sites, gm, arg_names)


def _input_names(model: nn.Module, args: tuple, kwargs: dict) -> list[str] | None:
    """The forward's argument names the example inputs fill (positional first), or None."""
    names: list[str] = []
    if args:
        try:
            sig = _inspect.signature(model.forward)
        except (TypeError, ValueError):
            return None
        pos = [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(pos) < len(args):
            return None
        names = pos[: len(args)]
    return names + [k for k in kwargs if k not in names]


def unwrap_model(model: nn.Module) -> nn.Module:
    # DistributedDataParallel / DataParallel keep the real network in .module.
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _discover_with_hooks(model: nn.Module, args: tuple, kwargs: dict) -> SiteGraph:
    names = {m: n for n, m in model.named_modules()}
    events: list[tuple[str, str, Any]] = []
    handles = []

    def act_hook(mod, inp):
        events.append(("act", names[mod], tuple(inp[0].shape)))

    def weight_hook(mod, inp, out):
        events.append(("weight", names[mod], None))

    try:
        for m in model.modules():
            if module_kind(m) is not None:
                handles.append(m.register_forward_pre_hook(act_hook))
            elif isinstance(m, WEIGHT_TYPES):
                handles.append(m.register_forward_hook(weight_hook))
        with eval_mode(model):
            try:
                model(*args, **kwargs)
            except Exception as e:
                raise DataError(
                    f"the model failed on example_inputs ({describe_inputs(args, kwargs)}): "
                    f"{type(e).__name__}: {e}"
                ) from e
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    sites: list[Site] = []
    calls: dict[str, int] = {}
    last_weight: str | None = None
    for kind_, name, shape in events:
        if kind_ == "weight":
            last_weight = name
            continue
        m = modules[name]
        kind = module_kind(m)
        k = calls.get(name, 0)
        calls[name] = k + 1
        params = module_params(kind, m)
        producers = [last_weight] if last_weight else []
        cdim = _channel_dim(shape, [modules[p] for p in producers])
        sites.append(
            Site(
                name=name if k == 0 else f"{name}:{k}",
                kind=kind,
                node="",
                module=name,
                producers=producers,
                channel_dim=cdim,
                channels=int(shape[cdim]),
                breakpoints=_breakpoints(kind, params),
                params=params,
                exact=kind not in ("gelu", "silu"),
                shape=shape,
            )
        )
    if not sites:
        raise ModelError(
            f"{type(model).__name__} has no supported activation module, and torch.fx could not "
            "trace it to find functional ones; use nn.ReLU/nn.GELU... modules or make the "
            "forward traceable"
        )
    return SiteGraph(sites, None, [])


def weight_layers(model: nn.Module) -> list[str]:
    """Names of every Conv/Linear layer of ``model`` (the set IMP prunes)."""
    model = unwrap_model(model)
    return [n for n, m in model.named_modules() if isinstance(m, WEIGHT_TYPES)]


def inspect(model: nn.Module, example_inputs: Any, file: Any = None) -> str:
    """Print (and return) a table of the model's activation sites.

    Columns: site name, activation, producer layer(s), channel axis, channels.

    Args:
        model: the network.
        example_inputs: a batch it accepts (see :func:`discover_sites`).
        file: where to print (default ``sys.stdout``); ``False`` prints nothing.

    Returns:
        The table as a string.

    Example:
        >>> import torch, torchvision, egp_fast
        >>> text = egp_fast.inspect(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32), file=False)
        >>> text.splitlines()[3]
        '1   layer1.0.relu    relu        layer1.0.conv1  1     64'
    """
    g = discover_sites(model, example_inputs)
    rows = [("#", "site", "activation", "producer", "axis", "channels")]
    for i, s in enumerate(g.sites):
        rows.append(
            (
                str(i),
                s.name,
                s.kind + ("" if s.exact else " (approx.)"),
                ", ".join(s.producers) or "-",
                str(s.channel_dim),
                str(s.channels),
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    buf = io.StringIO()
    for j, r in enumerate(rows):
        buf.write("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() + "\n")
        if j == 0:
            buf.write("  ".join("-" * w for w in widths) + "\n")
    mode = "fx trace" if g.traced else "module hooks (fx trace failed)"
    buf.write(f"{len(g.sites)} sites, {len(g.producer_layers())} producer layers, found by {mode}\n")
    text = buf.getvalue()
    if file is not False:
        print(text, end="", file=file or sys.stdout)
    return text
