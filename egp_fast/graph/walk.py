"""The producer walk: which weight layers feed a site, and the site's channel axis.

The *producers* of a site (docs/algorithm.md, "Terms: sites, neurons, states, producers") are
the weight layers (Conv/Linear) whose output feeds it, found by walking back through
normalisation, dropout, scalar arithmetic, reshapes, pooling and residual adds; at an add, the
branch with more weight layers since the fork point wins (the residual branch of a ResNet
block, not its identity or downsample shortcut).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from egp_fast.graph.sites import WEIGHT_TYPES, HFConv1D

# --------------------------------------------------------------------------------------------
# What the walk passes through.


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


# --------------------------------------------------------------------------------------------
# The walk.


class _Walker:
    def __init__(self, gm: fx.GraphModule, modules: dict[str, nn.Module] | None = None) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules()) if modules is None else modules
        self._anc: dict[fx.Node, frozenset[fx.Node]] = {}
        self._pos: dict[fx.Node, int] | None = None

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
        # Graph order of the nodes between `stop` and `n` (few: a residual branch), not a scan of
        # the whole graph per call.
        if self._pos is None:
            self._pos = {x: i for i, x in enumerate(self.gm.graph.nodes)}
        order = sorted(self.ancestors(n) - stop, key=self._pos.__getitem__)
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
