"""The shape pass of site discovery: every node's output shape on example inputs.

:func:`propagate_shapes` runs the traced graph once (on one sample, when discovery cuts the
batch) and records each tensor node's shape in ``node.meta["egp_shape"]``. Discovery needs the
shapes, not the values, so in graphs where no shape can depend on a value
(:func:`_shapes_value_free`) the common layers are not computed at all: a plain convolution,
an eval-mode batch norm, a ``Linear``, an elementwise activation, a residual add and a flatten
pass on a :class:`_Meta` (shape, dtype, device) worked out from their size rules, unless a
hook or an instance ``forward`` is attached to the module. Any other
node gets zeros of that shape in place of the skipped values and runs for real, and so does
any call the rules do not cover exactly (a dtype mix, a broadcast that fails, a subclass whose
forward may differ), so the errors the model would raise are still raised.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.modules.module as _module

from egp_fast.errors import DataError
from egp_fast.graph.inputs import describe_inputs, eval_mode, placeholder_args


class _Meta:
    """A tensor the shape pass did not compute: its shape, dtype and device only."""

    __slots__ = ("shape", "dtype", "device")

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.device = device

    def dim(self) -> int:
        return len(self.shape)

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)


_TensorLike = (torch.Tensor, _Meta)


class _ShapeRecorder(fx.Interpreter):
    """Runs ``gm`` and records every tensor node's output shape in ``node.meta["egp_shape"]``.

    With ``fast`` set (and only for graphs whose shapes cannot depend on values), the layers of
    :meth:`_shape_only` are not computed: they pass a :class:`_Meta` on, and a node outside
    those rules gets zeros of the right shape for each such input. A shape pass needs only
    shapes, and a convolution on a one-sample batch costs about as much as on a whole one.
    """

    def __init__(self, gm: Any, fast: bool = False) -> None:
        # gm: a GraphModule, or discovery's graph not yet built into one (run on its root, whose
        # submodules sit under the same qualified names)
        super().__init__(gm if isinstance(gm, fx.GraphModule) else gm.root, graph=gm.graph)
        # Global module hooks (nn.modules.module.register_module_forward_hook) may change any
        # module's output: then every module runs.
        hooked = bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)
        autocast = torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")
        self.fast = fast and not hooked and not autocast and _shapes_value_free(gm, self.submodules)

    def run_node(self, n: fx.Node) -> Any:
        out = None
        if self.fast:
            out = self._shape_only(n)
            if out is None:
                for p in n.all_input_nodes:  # this node runs for real: zeros for what was skipped
                    v = self.env.get(p)
                    if isinstance(v, _Meta):
                        self.env[p] = v.zeros()
        if out is None:
            out = super().run_node(n)
        if isinstance(out, _TensorLike):
            n.meta["egp_shape"] = tuple(out.shape)
        return out

    def _arg(self, a: Any) -> Any:
        return self.env.get(a) if isinstance(a, fx.Node) else a

    def _shape_only(self, n: fx.Node) -> _Meta | None:
        if n.op == "call_module":
            if len(n.args) != 1 or n.kwargs:
                return None
            x = self._arg(n.args[0])
            if not isinstance(x, _TensorLike):
                return None
            m = self.submodules.get(n.target)
            return None if m is None else _module_shape(m, x)
        if n.op == "call_function":
            rule = _FUNCTION_RULES.get(n.target)
        elif n.op == "call_method":
            rule = _METHOD_RULES.get(n.target)
        else:
            return None
        if rule is None or not n.args:
            return None
        x = self._arg(n.args[0])
        if not isinstance(x, _TensorLike):
            return None
        return rule(x, [self._arg(a) for a in n.args[1:]], {k: self._arg(v) for k, v in n.kwargs.items()})


# --------------------------------------------------------------------------------------------
# Size rules. Each returns None whenever the real call must decide (anything unusual, or an
# input the real call would reject), so the real call runs and raises what it raises.


def _module_shape(m: nn.Module, x: Any) -> _Meta | None:
    kind = type(m)  # exact types: a subclass may change forward
    if m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__:
        return None  # a hook or an instance forward may change what it returns: run it
    if kind in _CONV_DIMS:
        shape = _conv_out_shape(m, x)
        return None if shape is None else _Meta(shape, x.dtype, x.device)
    if kind in _NORM_DIMS:
        ok = x.dim() in _NORM_DIMS[kind] and x.shape[1] == m.num_features and not m.training
        ok = ok and (m.weight is None or (m.weight.dtype == x.dtype and m.weight.device == x.device))
        return _Meta(x.shape, x.dtype, x.device) if ok else None
    if kind is nn.Linear:
        w = m.weight
        ok = x.dim() >= 1 and x.shape[-1] == m.in_features and x.dtype == w.dtype and x.device == w.device
        return _Meta((*x.shape[:-1], m.out_features), x.dtype, x.device) if ok else None
    if kind in _ELEMENTWISE_MODULES and x.dtype.is_floating_point:
        return _Meta(x.shape, x.dtype, x.device)
    return None


def _conv_out_shape(m: nn.Module, x: Any) -> tuple[int, ...] | None:
    """The output shape of convolution ``m`` on ``x`` (batched, zero padding, ``x`` of the
    weight's dtype and device); ``None`` when the real convolution must decide (anything else,
    or an output that would be empty, which the real one rejects)."""
    d = _CONV_DIMS[type(m)]
    w = m.weight
    if m.padding_mode != "zeros" or x.dim() != d + 2 or x.shape[1] != m.in_channels:
        return None
    if x.dtype != w.dtype or x.device != w.device:
        return None
    out = [x.shape[0], m.out_channels]
    for i in range(d):
        size, k, s, dil = x.shape[2 + i], m.kernel_size[i], m.stride[i], m.dilation[i]
        if m.padding == "same":
            o = size
        else:
            p = 0 if m.padding == "valid" else m.padding[i]
            o = (size + 2 * p - dil * (k - 1) - 1) // s + 1
        if o <= 0:
            return None
        out.append(o)
    return tuple(out)


def _same_shape(x: Any, args: list[Any], kwargs: dict[str, Any]) -> _Meta | None:
    # An elementwise activation: the shape and dtype of its input (floating inputs only; the
    # real call decides what an integer input does). Its other arguments are plain numbers.
    if not x.dtype.is_floating_point or any(isinstance(v, _TensorLike) for v in [*args, *kwargs.values()]):
        return None
    return _Meta(x.shape, x.dtype, x.device)


def _add_shape(inplace: bool):
    def rule(x: Any, args: list[Any], kwargs: dict[str, Any]) -> _Meta | None:
        if len(args) != 1 or set(kwargs) - {"alpha"} or not x.dtype.is_floating_point:
            return None
        y = args[0]
        if isinstance(y, _TensorLike):
            if y.dtype != x.dtype or y.device != x.device:
                return None  # type promotion and device rules: the real add decides
            if x.shape == y.shape:
                shape = x.shape  # a residual add: no broadcasting to work out
            else:
                try:
                    shape = torch.broadcast_shapes(x.shape, y.shape)
                except RuntimeError:
                    return None
            if inplace and shape != x.shape:
                return None
            return _Meta(shape, x.dtype, x.device)
        if type(y) in (int, float):  # a Python number keeps a floating tensor's dtype
            return _Meta(x.shape, x.dtype, x.device)
        return None

    return rule


def _flatten_shape(x: Any, args: list[Any], kwargs: dict[str, Any]) -> _Meta | None:
    if len(args) > 2 or set(kwargs) - {"start_dim", "end_dim"}:
        return None
    start = kwargs.get("start_dim", args[0] if args else 0)
    end = kwargs.get("end_dim", args[1] if len(args) > 1 else -1)
    if type(start) is not int or type(end) is not int:
        return None
    shape, nd = tuple(x.shape), x.dim()
    if nd == 0:
        return None
    s, e = start + nd if start < 0 else start, end + nd if end < 0 else end
    if not (0 <= s <= e < nd):
        return None
    size = 1
    for d in shape[s : e + 1]:
        size *= d
    return _Meta((*shape[:s], size, *shape[e + 1 :]), x.dtype, x.device)


_CONV_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_NORM_DIMS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}
_ELEMENTWISE_MODULES = {
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
    nn.Tanh, nn.ELU, nn.Mish, nn.Identity, nn.Dropout,
}
_FUNCTION_RULES = {
    **dict.fromkeys((F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.leaky_relu,
                     torch.sigmoid, torch.tanh), _same_shape),
    operator.add: _add_shape(False), torch.add: _add_shape(False), operator.iadd: _add_shape(True),
    torch.flatten: _flatten_shape,
}
_METHOD_RULES = {
    "relu": _same_shape, "relu_": _same_shape, "add": _add_shape(False), "add_": _add_shape(True),
    "flatten": _flatten_shape,
}

# Ops whose output shape depends on the values of their inputs (or that test values): a graph
# holding one is run for real, so zeros standing in for skipped values cannot change it.
_VALUE_SHAPED = {
    "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount",
    "repeat_interleave", "item", "tolist", "_assert", "_assert_async", "where", "histc",
    "masked_scatter", "index_select", "take", "gather", "numel", "any", "all", "equal",
}


def _shapes_value_free(gm: Any, modules: dict[str, nn.Module] | None = None) -> bool:
    """Whether no node's output shape can depend on tensor values: every module is a torch.nn
    module, no op of :data:`_VALUE_SHAPED` is called, and no indexing uses a tensor index.
    ``modules``: ``gm``'s submodules by qualified name, when the caller has them."""
    if modules is None:
        modules = dict(gm.named_modules())
    for n in gm.graph.nodes:
        op = n.op
        if op == "call_module":
            if not type(modules[n.target]).__module__.startswith("torch.nn."):
                return False  # a library or user module: its code may look at values
        elif op == "call_function" or op == "call_method":
            t = n.target
            name = t if isinstance(t, str) else getattr(t, "__name__", "")
            if name in _VALUE_SHAPED:
                return False
            if name == "getitem" and any(isinstance(a, fx.Node) for a in _flatten(n.args[1:])):
                return False
    return True


def _flatten(v: Any) -> list[Any]:
    if isinstance(v, (tuple, list)):
        return [x for e in v for x in _flatten(e)]
    if isinstance(v, slice):
        return [v.start, v.stop, v.step]
    return [v]


def propagate_shapes(model: nn.Module, gm: fx.GraphModule, args: tuple, kwargs: dict) -> None:
    """Record every tensor node's output shape on ``args``/``kwargs`` in
    ``node.meta["egp_shape"]`` (the values computed are not kept; common layers are not
    computed when no shape in the graph can depend on values).

    Raises:
        DataError: the model rejects the inputs (its exception chained).
    """
    values, _ = placeholder_args(model, gm, args, kwargs)
    with eval_mode(model):
        try:
            _ShapeRecorder(gm, fast=True).run(*values)
        except Exception as e:  # the model rejected the example inputs
            raise DataError(
                f"the model failed on example_inputs ({describe_inputs(args, kwargs)}): "
                f"{type(e).__name__}: {e}"
            ) from e
