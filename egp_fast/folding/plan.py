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

Timings are noisy, so ``fold="latency"`` plans each chain under FLOPs as well and departs from
that plan only when the timed saving exceeds the noise of the segments that differ plus a
margin; :func:`egp_fast.collapse` then times the two collapsed models against each other and
keeps the FLOPs plan's model unless the latency plan's is faster. A chain whose output is added
to its own input (a residual block with its inner sites removed) prices that addition: merged
into one layer, the chain absorbs it (the identity joins the kernel centre).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from torch.utils._pytree import tree_leaves

from egp_fast.folding.geometry import _CONVS, _b, _conv_out, _geom, _w
from egp_fast.folding.latency import compare_latency
from egp_fast.graph import normalize_inputs

__all__ = ["LatencyCost", "LayerSpec", "absorbs_identity", "flops_cost", "plan_chain"]


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
flops_cost.add = lambda shape: float(math.prod(shape))  # type: ignore[attr-defined]  # one FLOP per element


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


def _partition(price: dict[tuple[int, int], float], n: int) -> tuple[list[tuple[int, int]], float]:
    """Cheapest split of ``0..n-1`` into consecutive segments (dynamic programming)."""
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
    if not best[n] <= unmerged:  # ties and rounding: never worse than leaving the chain alone
        return [(i, i) for i in range(n)], unmerged
    return out, best[n]


def absorbs_identity(spec: LayerSpec) -> bool:
    """Whether ``x + layer(x)`` is one layer of this configuration (the identity added to the
    kernel centre): same input and output shape, stride 1, the centre tap reaches the input."""
    if spec.in_shape != spec.out_shape or spec.cin != spec.cout:
        return False
    if spec.kind == "linear":
        return True
    return all(s == 1 and p % d == 0 and p // d <= k - 1 for s, p, d, k in zip(spec.s, spec.p, spec.d, spec.k))


def plan_chain(modules: list[nn.Module], in_shapes: list, out_shapes: list, exact: bool,
               cost: Callable[[LayerSpec], float], *, residual: tuple[int, ...] | None = None,
               reference: Callable[[LayerSpec], float] | None = None, margin: float = 0.0) -> dict[str, Any] | None:
    """Best partition of a chain of layers into merged segments.

    Args:
        modules: the chain's layers, in order (each feeds only the next through a removed site).
        in_shapes, out_shapes: each layer's input and output shape.
        exact: refuse border-inexact compositions (two zero-padded convs).
        cost: prices a :class:`LayerSpec` (``flops_cost``, a :class:`LatencyCost`, or your own).
            It may also price the residual addition (``cost.add(shape)``; ``flops_cost``
            counts one FLOP per element; default 0) and say how uncertain a price is
            (``cost.noise(spec)``, in the cost's unit; default 0).
        residual: the shape of ``x + chain(x)`` when the chain's output is added to its own
            input (a residual block whose inner sites are all removed). The whole chain merged
            into one layer then absorbs the addition (the identity joins the kernel centre,
            DepthShrinker's merge), so every other partition also pays for the addition.
        reference: a second cost (``fold="latency"`` passes ``flops_cost``). The chain is planned
            under it too, and the plan under ``cost`` is used only when, priced by ``cost``, it
            saves more than ``margin`` times the reference plan's cost plus the noise of the
            segments where the two plans differ; otherwise the reference plan is used.
        margin: relative saving a departure from the reference plan must exceed.

    Returns:
        ``{"segments": [(i, j), ...]`` (inclusive index ranges, merged when ``i < j``),
        ``"cost"`` (the plan's total under ``cost``), ``"unmerged"`` (the chain left alone),
        ``"segment_costs"``, ``"border"`` (ranges refused only because ``exact=True``),
        ``"residual"`` (whether the plan absorbs the residual addition; ``"add_cost"`` its
        price)}; with ``reference`` also ``"reference_segments"``, ``"reference_cost"`` (the
        reference plan priced by ``cost``), ``"saving"``, ``"noise"`` and ``"departed"``
        (whether ``segments`` differ from the reference plan). None when a layer cannot be
        priced.
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
    whole = seg[(0, n - 1)]
    absorb = residual is not None and whole is not None and absorbs_identity(whole)
    add_price = float(cost.add(tuple(residual))) if absorb and hasattr(cost, "add") else 0.0

    def plan_under(c: Callable[[LayerSpec], float]) -> tuple[list[tuple[int, int]], dict]:
        price = {k: (float(c(s)) if s is not None else math.inf) for k, s in seg.items()}
        extra = float(c.add(tuple(residual))) if absorb and hasattr(c, "add") else 0.0
        segs, best = _partition(price, n)
        if absorb and price[(0, n - 1)] <= best + extra:
            segs = [(0, n - 1)]
        return segs, price

    out, price = plan_under(cost)

    def total(segs: list[tuple[int, int]]) -> float:
        return sum(price[s] for s in segs) + (0.0 if segs == [(0, n - 1)] and absorb else add_price)

    res: dict[str, Any] = {"border": border, "add_cost": add_price}
    if reference is not None:
        ref, _ = plan_under(reference)
        noise_of = getattr(cost, "noise", None)
        differ = [s for s in set(out) ^ set(ref) if seg[s] is not None]
        noise = sum(float(noise_of(seg[s])) for s in differ) if noise_of is not None else 0.0
        saving = total(ref) - total(out)
        departed = out != ref and saving > noise + margin * total(ref)
        res.update(reference_segments=ref, reference_cost=total(ref), saving=saving, noise=noise,
                   departed=departed)
        if not departed:
            out = ref
    res.update(segments=out, cost=total(out), unmerged=total([(i, i) for i in range(n)]),
               segment_costs=[price[s] for s in out], residual=absorb and out == [(0, n - 1)])
    return res


class _Add(nn.Module):
    """``x + x``: the residual addition a merged layer absorbs, as :class:`LatencyCost` times it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + x


class LatencyCost:
    """Prices a layer by timing it alone on ``device`` (``fold="latency"``).

    Each configuration and input shape is timed once and cached. :meth:`measure` times all
    uncached candidates of a chain together, in interleaved rounds (each round runs every
    candidate once, in alternating order), so load drifts on the machine hit them alike; the
    cost is the median milliseconds per forward and :meth:`noise` the interquartile range of
    the rounds. The planner departs from the FLOPs plan only for a saving above that noise plus
    ``margin``, and :func:`egp_fast.collapse` then checks the whole model (:meth:`confirm`).

    Args:
        device: where to time (the model's device).
        dtype: the model's dtype.
        rounds: interleaved rounds (few: planning should stay cheap).
        min_run_s: a run repeats the forward until it lasts this long.
        margin: relative saving (of the chain's FLOPs-plan time) a latency plan must predict
            before it is preferred to the FLOPs plan.
        check_batches: batch sizes at which :meth:`confirm` times the two collapsed models
            (default: batch 1 and the example batch).
        check_budget_s: seconds per batch size for :meth:`confirm`.
    """

    metric = "ms"

    def __init__(self, device: Any = None, dtype: Any = None, rounds: int = 7, min_run_s: float = 0.002,
                 margin: float = 0.05, check_batches: tuple[int, ...] | None = None,
                 check_budget_s: float = 3.0) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype or torch.float32
        self.rounds = rounds
        self.min_run_s = min_run_s
        self.margin = margin
        self.check_batches = check_batches
        self.check_budget_s = check_budget_s
        self.cache: dict[tuple, float] = {}
        self.spread: dict[tuple, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _time(self, todo: dict[tuple, tuple[nn.Module, tuple[int, ...]]]) -> None:
        runs = []
        with torch.no_grad():
            for key, (layer, shape) in todo.items():
                layer = layer.eval()
                x = torch.randn(shape, device=self.device, dtype=self.dtype)
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
                    times.append(1e3 * (time.perf_counter() - t0) / k)
        for key, _, _, _, times in runs:
            q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
            self.cache[key] = statistics.median(times)
            self.spread[key] = q[2] - q[0]

    def measure(self, specs: list[LayerSpec]) -> None:
        """Time every candidate not yet cached, interleaved."""
        self._time({s.key: (s.build(self.device, self.dtype), s.in_shape) for s in specs if s.key not in self.cache})

    def __call__(self, spec: LayerSpec) -> float:
        if spec.key not in self.cache:
            self.measure([spec])
        return self.cache[spec.key]

    def noise(self, spec: LayerSpec) -> float:
        """Interquartile range of the rounds (ms): how far the price of ``spec`` can be trusted."""
        self(spec)
        return self.spread[spec.key]

    def add(self, shape: tuple[int, ...]) -> float:
        """Milliseconds of one elementwise addition of this shape (a residual merge saves it)."""
        key = ("add", tuple(shape))
        if key not in self.cache:
            self._time({key: (_Add(), tuple(shape))})
        return self.cache[key]

    def confirm(self, reference: nn.Module, candidate: nn.Module, example_inputs: Any) -> dict[str, Any]:
        """Time the FLOPs-plan model (``reference``) and the latency-plan one interleaved.

        Returns:
            ``{"faster": bool, "batches": {batch: {"reference_ms", "latency_ms", "speedup",
            "speedup_iqr", "inside_noise"}}}``: ``faster`` only when the latency plan is faster
            beyond the noise at every checked batch size.
        """
        args, kwargs = normalize_inputs(example_inputs)
        lead = next((t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() >= 1), None)
        batches = self.check_batches or tuple(dict.fromkeys((1, int(lead.shape[0]) if lead is not None else 1)))
        lat = compare_latency(reference, candidate, example_inputs, batch_sizes=batches,
                              budget_s=self.check_budget_s, max_rounds=15)
        rows = {int(b): {"reference_ms": r["a_ms"], "latency_ms": r["b_ms"], "speedup": r["speedup"],
                         "speedup_iqr": r["speedup_iqr"], "inside_noise": r["inside_noise"]}
                for b, r in lat["batches"].items()}
        return {"faster": all(r["speedup"] > 1.0 and not r["inside_noise"] for r in rows.values()), "batches": rows}
