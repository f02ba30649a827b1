"""Site discovery: every nonlinearity call in the forward pass, its producers and channel axis.

A *site* is one call of an activation (EGP.md, "Terms"): a module called twice is two sites
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
import inspect as _inspect
import io
import operator
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from egp_fast.errors import DataError, ModelError

# --------------------------------------------------------------------------------------------
# What counts as an activation, a weight layer, and a transparent step between them.

WEIGHT_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

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


def _module_kind(m: nn.Module) -> str | None:
    # ReLU6 derives from Hardtanh: test it first.
    if isinstance(m, nn.ReLU6):
        return "relu6"
    if isinstance(m, nn.ReLU):
        return "relu"
    if isinstance(m, nn.Hardtanh):
        return "hardtanh"
    if isinstance(m, nn.LeakyReLU):
        return "leaky_relu"
    if isinstance(m, nn.PReLU):
        return "prelu"
    if isinstance(m, nn.GELU):
        return "gelu"
    if isinstance(m, nn.SiLU):
        return "silu"
    return None


_FUNCTION_KINDS: dict[Any, str] = {
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

_METHOD_KINDS = {"relu": "relu", "relu_": "relu"}

SUPPORTED_ACTIVATIONS = ("relu", "relu6", "hardtanh", "leaky_relu", "prelu", "gelu", "silu")


def _module_params(kind: str, m: nn.Module) -> dict[str, Any]:
    if kind in ("relu6", "hardtanh"):
        return {"min_val": float(m.min_val), "max_val": float(m.max_val)}
    if kind == "leaky_relu":
        return {"negative_slope": float(m.negative_slope)}
    if kind == "gelu":
        return {"approximate": m.approximate}
    return {}


def _function_params(kind: str, node: fx.Node) -> dict[str, Any]:
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


def normalize_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` from a tensor, a tuple/list of positional args, or a dict of kwargs."""
    if example_inputs is None:
        raise DataError(
            "example_inputs is None; pass a batch the model accepts (a tensor, a tuple of "
            "positional inputs, or a dict of keyword inputs)"
        )
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise DataError(
        f"example_inputs has type {type(example_inputs).__name__}; pass a tensor, a tuple of "
        "positional inputs, or a dict of keyword inputs"
    )


def _placeholder_args(
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
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, t in flags:
            m.training = t


# --------------------------------------------------------------------------------------------
# Tracing.


class _Tracer(fx.Tracer):
    """Default leaves (torch.nn modules) plus activation modules defined outside torch.nn."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if _module_kind(m) is not None or isinstance(m, WEIGHT_TYPES):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` with torch.fx, activation and weight modules kept as leaves.

    The result shares the model's submodules and parameters (no copy). Use it as the model
    when a functional activation in the root ``forward`` must be linearised in place.

    Args:
        model: the network; its forward must be traceable (no data-dependent control flow).

    Returns:
        An ``fx.GraphModule`` computing the same function.

    Example:
        >>> import torch, egp_fast
        >>> gm = egp_fast.trace(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
        >>> isinstance(gm, torch.fx.GraphModule)
        True
    """
    tracer = _Tracer()
    graph = tracer.trace(model)
    name = model.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name)


class _ShapeRecorder(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            n.meta["egp_shape"] = tuple(out.shape)
        return out


def _propagate_shapes(model: nn.Module, gm: fx.GraphModule, args: tuple, kwargs: dict) -> None:
    values, _ = _placeholder_args(model, gm, args, kwargs)
    with eval_mode(model):
        try:
            _ShapeRecorder(gm).run(*values)
        except Exception as e:  # the model rejected the example inputs
            raise DataError(
                f"the model failed on example_inputs ({_describe(args, kwargs)}): "
                f"{type(e).__name__}: {e}"
            ) from e


def _describe(args: tuple, kwargs: dict) -> str:
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
    if producer_modules and all(isinstance(m, nn.Linear) for m in producer_modules):
        return -1  # token features [N, L, C] / [N, H, W, C]
    if producer_modules:
        return 1
    return -1 if len(shape) == 3 else 1


# --------------------------------------------------------------------------------------------
# Discovery.


def _site_name_for_functional(node: fx.Node, owner_counts: dict[str, int]) -> str:
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
    model = _unwrap(model)
    args, kwargs = normalize_inputs(example_inputs)
    try:
        gm = trace(model)
    except Exception as e:  # fx cannot follow data-dependent control flow and friends
        warnings.warn(
            f"egp_fast: torch.fx could not trace {type(model).__name__} ({type(e).__name__}: "
            f"{str(e)[:200]}); falling back to module hooks: functional activations (F.relu, "
            "x.relu()) are not seen and producers are inferred from execution order",
            stacklevel=2,
        )
        return _discover_with_hooks(model, args, kwargs)
    _propagate_shapes(model, gm, args, kwargs)
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
            kind = _module_kind(m) if m is not None else None
            if kind:
                params = _module_params(kind, m)
                module_name = node.target
        elif node.op == "call_function" and node.target in _FUNCTION_KINDS:
            kind = _FUNCTION_KINDS[node.target]
            params = _function_params(kind, node)
        elif node.op == "call_method" and node.target in _METHOD_KINDS:
            kind = _METHOD_KINDS[node.target]
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
            name = _site_name_for_functional(node, owner_counts)
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
    _, arg_names = _placeholder_args(model, gm, args, kwargs)
    return SiteGraph(sites, gm, arg_names)


def _unwrap(model: nn.Module) -> nn.Module:
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
            if _module_kind(m) is not None:
                handles.append(m.register_forward_pre_hook(act_hook))
            elif isinstance(m, WEIGHT_TYPES):
                handles.append(m.register_forward_hook(weight_hook))
        with eval_mode(model):
            try:
                model(*args, **kwargs)
            except Exception as e:
                raise DataError(
                    f"the model failed on example_inputs ({_describe(args, kwargs)}): "
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
        kind = _module_kind(m)
        k = calls.get(name, 0)
        calls[name] = k + 1
        params = _module_params(kind, m)
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
    model = _unwrap(model)
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
