"""Chain-level fold planning: which runs of layers joined by removed sites become one layer.

Judging one pair of layers at a time misses merges that only pay as a whole: in a MobileNetV2
inverted residual with both activations removed, ``1x1 (C->6C)`` composed with the depthwise
``3x3`` alone is a dense ``3x3 C->6C`` (more FLOPs than the two parts), yet the whole chain
``1x1 -> dw3x3 -> 1x1`` is one dense ``3x3 C->C``: ``9C^2`` against ``12C^2 + 54C`` per position
(DepthShrinker's merge); the residual identity then folds into its kernel centre.

:func:`plan_chain` takes a maximal run of weight layers ``L1 -> ... -> Ln`` (each fed only by the
previous one through a removed site) and chooses, by dynamic programming over split points, the
partition into consecutive segments (each merged into one layer) of least total cost. Leaving
every layer alone is one of the partitions, so the plan never costs more than the unmerged
chain under its own cost. A segment whose composition is impossible (output sizes do not line
up, unsupported conv) or border-inexact while ``exact=True`` costs infinity.

Costs price a :class:`LayerSpec` (the layer that would be built, with its input shape):
``flops_cost`` (``fold="auto"``), :class:`LatencyCost` (``fold="latency"``: the layer is built
with random weights and timed alone on the model's device, interleaved with the other
candidates of the chain, cached per configuration and input shape), or any callable
``spec -> float`` passed as ``collapse(..., cost=...)``.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from egp_fast.folding.geometry import _CONVS, _b, _conv_out, _geom, _w

__all__ = ["LatencyCost", "LayerSpec", "flops_cost", "plan_chain"]


@dataclass(frozen=True)
class LayerSpec:
    """A conv or linear layer as the planner prices it.

    ``kind`` is ``"conv"`` or ``"linear"``; ``cin``/``cout`` channels (features); ``k``, ``s``,
    ``p``, ``d`` per-dimension kernel, stride, padding and dilation (empty for a linear);
    ``groups``; ``in_shape``/``out_shape`` the tensor shapes around it; ``merged`` whether it is
    a candidate built from several layers.
    """

    kind: str
    cin: int
    cout: int
    k: tuple[int, ...]
    s: tuple[int, ...]
    p: tuple[int, ...]
    d: tuple[int, ...]
    groups: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    merged: bool = False

    @property
    def key(self) -> tuple:
        """Configuration and input shape (what a latency is cached by)."""
        return (self.kind, self.cin, self.cout, self.k, self.s, self.p, self.d, self.groups, self.in_shape)

    @property
    def flops(self) -> int:
        """Multiply-add FLOPs (2 per MAC), as :func:`egp_fast.folding.layer_flops` counts them."""
        per = self.cin // self.groups
        for x in self.k:
            per *= x
        return 2 * math.prod(self.out_shape) * per

    def build(self, device: Any = None, dtype: Any = None) -> nn.Module:
        """A layer of this configuration with random weights (for timing)."""
        if self.kind == "linear":
            return nn.Linear(self.cin, self.cout, device=device, dtype=dtype)
        cls = _CONVS[len(self.k) - 1]
        return cls(self.cin, self.cout, self.k, stride=self.s, padding=self.p, dilation=self.d,
                   groups=self.groups, device=device, dtype=dtype)


def flops_cost(spec: LayerSpec) -> float:
    """The cost ``fold="auto"`` minimises: FLOPs."""
    return float(spec.flops)


flops_cost.metric = "flops"  # type: ignore[attr-defined]


def layer_spec(m: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> LayerSpec | None:
    """The spec of an existing conv/linear, or None when the planner cannot price it."""
    if isinstance(m, nn.Linear):
        return LayerSpec("linear", m.in_features, m.out_features, (), (), (), (), 1, tuple(in_shape), tuple(out_shape))
    g = _geom(m)
    if g is None:
        return None
    w = _w(m)
    return LayerSpec("conv", w.shape[1] * g["g"], w.shape[0], g["k"], g["s"], g["p"], g["d"], g["g"],
                     tuple(in_shape), tuple(out_shape))


def _merge(a: LayerSpec, b: LayerSpec, a_bias_zero: bool, exact: bool) -> LayerSpec | str:
    """The spec of ``b ∘ a`` (as :meth:`MergePasses._compose_conv` builds it), or why not."""
    if a.kind != b.kind:
        return "a linear and a conv do not compose"
    if a.kind == "linear":
        return LayerSpec("linear", a.cin, b.cout, (), (), (), (), 1, a.in_shape, b.out_shape, True)
    nd = len(a.k)
    pointwise_a = all(k == 1 for k in a.k) and not any(a.p) and a_bias_zero
    if any(b.p) and not pointwise_a and exact:
        return "border"
    stride = tuple(s1 * s2 for s1, s2 in zip(a.s, b.s))
    pad = tuple(p1 + p2 * s1 for p1, p2, s1 in zip(a.p, b.p, a.s))
    span = tuple((a.k[i] - 1) * a.d[i] + (b.k[i] - 1) * b.d[i] * a.s[i] + 1 for i in range(nd))
    for i in range(nd):
        if _conv_out(a.in_shape[2 + i], span[i], stride[i], 1, pad[i]) != b.out_shape[2 + i]:
            return "output size"
    groups = a.groups if a.groups == b.groups else 1
    return LayerSpec("conv", a.cin, b.cout, span, stride, pad, (1,) * nd, groups, a.in_shape, b.out_shape, True)


def plan_chain(modules: list[nn.Module], in_shapes: list, out_shapes: list, exact: bool,
               cost: Callable[[LayerSpec], float]) -> dict[str, Any] | None:
    """Best partition of a chain of layers into merged segments.

    Args:
        modules: the chain's layers, in order (each feeds only the next through a removed site).
        in_shapes, out_shapes: each layer's input and output shape.
        exact: refuse border-inexact compositions (two zero-padded convs).
        cost: prices a :class:`LayerSpec` (``flops_cost``, a :class:`LatencyCost`, or your own).

    Returns:
        ``{"segments": [(i, j), ...]`` (inclusive index ranges, merged when ``i < j``),
        ``"cost"`` (the plan's total), ``"unmerged"`` (the chain left alone),
        ``"segment_costs"``, ``"border"`` (ranges refused only because ``exact=True``)}; None
        when a layer cannot be priced.
    """
    n = len(modules)
    parts = [layer_spec(m, i, o) for m, i, o in zip(modules, in_shapes, out_shapes)]
    if any(p is None for p in parts):
        return None
    zero_bias = [not bool(_b(m, _w(m).shape[0], _w(m)).any()) for m in modules]
    seg: dict[tuple[int, int], LayerSpec | None] = {}
    border: list[tuple[int, int]] = []
    for i in range(n):
        acc: LayerSpec | str = parts[i]
        bias0 = zero_bias[i]
        seg[(i, i)] = parts[i]
        for j in range(i + 1, n):
            if isinstance(acc, str):
                seg[(i, j)] = None
                continue
            nxt = _merge(acc, parts[j], bias0, exact)
            if nxt == "border":
                border.append((i, j))
            acc = nxt
            bias0 = bias0 and zero_bias[j]
            seg[(i, j)] = acc if isinstance(acc, LayerSpec) else None
    specs = [s for s in seg.values() if s is not None]
    if hasattr(cost, "measure"):
        cost.measure(specs)
    price = {k: (float(cost(s)) if s is not None else math.inf) for k, s in seg.items()}
    best = [0.0] + [math.inf] * n
    back = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            c = best[i] + price[(i, j - 1)]
            if c < best[j]:
                best[j], back[j] = c, i
    out: list[tuple[int, int]] = []
    j = n
    while j > 0:
        out.append((back[j], j - 1))
        j = back[j]
    out.reverse()
    unmerged = sum(price[(i, i)] for i in range(n))
    if best[n] > unmerged:  # ties and rounding: never worse than leaving the chain alone
        out, best[n] = [(i, i) for i in range(n)], unmerged
    return {"segments": out, "cost": best[n], "unmerged": unmerged,
            "segment_costs": [price[s] for s in out], "border": border}


class LatencyCost:
    """Prices a layer by timing it alone on ``device`` (``fold="latency"``).

    Each configuration and input shape is timed once and cached. :meth:`measure` times all
    uncached candidates of a chain together, in interleaved rounds (each round runs every
    candidate once, in alternating order), so load drifts on the machine hit them alike; the
    cost is the median milliseconds per forward.

    Args:
        device: where to time (the model's device).
        dtype: the model's dtype.
        rounds: interleaved rounds (few: planning should stay cheap).
        min_run_s: a run repeats the forward until it lasts this long.
    """

    metric = "ms"

    def __init__(self, device: Any = None, dtype: Any = None, rounds: int = 5, min_run_s: float = 0.002) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype or torch.float32
        self.rounds = rounds
        self.min_run_s = min_run_s
        self.cache: dict[tuple, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def measure(self, specs: list[LayerSpec]) -> None:
        todo = {s.key: s for s in specs if s.key not in self.cache}
        if not todo:
            return
        runs = []
        with torch.no_grad():
            for key, s in todo.items():
                layer = s.build(self.device, self.dtype).eval()
                x = torch.randn(s.in_shape, device=self.device, dtype=self.dtype)
                layer(x)
                self._sync()
                t0 = time.perf_counter()
                layer(x)
                self._sync()
                k = max(1, math.ceil(self.min_run_s / max(time.perf_counter() - t0, 1e-9)))
                runs.append((key, layer, x, k, []))
            for r in range(self.rounds):
                for key, layer, x, k, times in (runs if r % 2 == 0 else runs[::-1]):
                    self._sync()
                    t0 = time.perf_counter()
                    for _ in range(k):
                        layer(x)
                    self._sync()
                    times.append((time.perf_counter() - t0) / k)
        for key, _, _, _, times in runs:
            self.cache[key] = 1e3 * statistics.median(times)

    def __call__(self, spec: LayerSpec) -> float:
        if spec.key not in self.cache:
            self.measure([spec])
        return self.cache[spec.key]
