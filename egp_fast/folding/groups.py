"""Which activation sites must go together for a merge to pay, and what the merge would save.

Collapse can only merge weight layers that are joined by removed sites (docs/algorithm.md,
"Cost-aware folding"), and often only a whole run of them pays: in an inverted residual
``1x1 -> act -> dw3x3 -> act -> 1x1`` neither activation alone unlocks a cheaper layer, both
together turn the block into one dense ``3x3`` conv. This module finds those runs from the
traced graph alone (no layer class names):

* a *layer chain* (:class:`LayerChain`) is a maximal run of weight layers ``L1 -> ... -> Ln``
  of one kind (all convolutions or all linear layers) where each ``Li`` feeds only ``L(i+1)``,
  through exactly one activation site (live, or already replaced by a
  :class:`~egp_fast.folding.ChannelAffine`) and nothing but BatchNorm, dropout or identity
  modules. Anything else ends a chain: a second user (a residual fork), an addition, a
  concatenation, pooling, a reshape, a normalisation that is not per-channel affine;
* a *removal group* (:class:`RemovalGroup`) is a contiguous run of a chain's live sites: removing
  it joins the layers between them (and across already-removed sites around them) into one
  stretch that the chain planner (:func:`egp_fast.folding.plan_chain`) may merge.

:func:`removal_groups` prices each group by the cost the planner would save (FLOPs, or a
:class:`~egp_fast.folding.LatencyCost`), and :func:`predicted_speedup` gives the predicted
speed-up of the whole collapsed model under the same cost. EASIER's ``objective="latency"``
ranks its removals with them (:mod:`egp_fast.pruning.methods.easier`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from egp_fast.folding.affine import ChannelAffine, _channel_affine
from egp_fast.folding.geometry import _CONVS
from egp_fast.folding.plan import LayerSpec, layer_spec, plan_chain
from egp_fast.graph import SiteGraph

__all__ = ["LayerChain", "RemovalGroup", "layer_chains", "predicted_speedup", "removal_groups"]

#: Modules a chain passes through: folded into the neighbouring layers by collapse.
_PASS = (nn.modules.batchnorm._BatchNorm, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
         nn.AlphaDropout, nn.Identity)
_WEIGHTS = (*_CONVS, nn.Linear)


@dataclass
class LayerChain:
    """A maximal run of weight layers joined one to the next by one activation site each.

    Attributes:
        layers: the weight layers' module names, in execution order (at least two).
        sites: ``sites[i]`` joins ``layers[i]`` to ``layers[i + 1]``.
        removed: ``removed[i]``: ``sites[i]`` is already replaced by an affine map.
        modules: the layer modules (shared with the model, not copies).
        in_shapes, out_shapes: each layer's input and output shape on the example inputs.
        biased: ``biased[i]``: ``layers[i]`` will carry a bias once collapse has folded the
            BatchNorm or affine map after it (it decides which compositions are exact).
    """

    layers: list[str]
    sites: list[str]
    removed: list[bool]
    modules: list[nn.Module] = field(repr=False)
    in_shapes: list[tuple[int, ...]] = field(repr=False)
    out_shapes: list[tuple[int, ...]] = field(repr=False)
    biased: list[bool] = field(repr=False)


@dataclass
class RemovalGroup:
    """Live sites whose joint removal lets collapse merge the layers between them.

    Attributes:
        sites: the live sites to remove, in execution order.
        layers: the layers of the chain the group belongs to.
        saving: predicted cost saved by removing them, given the sites already removed
            (``0.0``: the planner would merge nothing more).
        metric: the unit of ``saving`` (``"flops"``, ``"ms"`` or ``"cost"``).
    """

    sites: list[str]
    layers: list[str]
    saving: float
    metric: str


def _shape(n: Any) -> tuple[int, ...] | None:
    s = n.meta.get("egp_shape") if isinstance(n, fx.Node) else None
    return tuple(s) if s is not None else None


def layer_chains(graph: SiteGraph) -> list[LayerChain]:
    """The layer chains of a traced model (see the module docstring for the definition).

    Args:
        graph: the model's :class:`~egp_fast.SiteGraph` (``egp_fast.discover_sites``); its
            graph module shares the model's modules, and already-linearised sites appear in it
            as :class:`~egp_fast.folding.ChannelAffine` modules.

    Returns:
        The chains, in execution order of their first layer; empty when the model was not
        traced by ``torch.fx``.

    Example:
        >>> import torch, egp_fast
        >>> from egp_fast.folding.groups import layer_chains
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8),
        ...                           torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> [(c.layers, c.sites) for c in layer_chains(egp_fast.discover_sites(net, torch.randn(2, 4)))]
        [(['0', '2', '4'], ['1', '3'])]
    """
    gm = graph.graph_module
    if gm is None:
        return []
    mods = dict(gm.named_modules())
    site_at = {s.node: s.name for s in graph.sites if s.node}

    def weight(n: fx.Node) -> nn.Module | None:
        m = mods.get(n.target) if n.op == "call_module" else None
        return m if isinstance(m, _WEIGHTS) else None

    links: dict[fx.Node, tuple[fx.Node, str, bool, bool]] = {}
    for n in gm.graph.nodes:
        a = weight(n)
        if a is None:
            continue
        cur, join, removed, biased = n, None, False, False
        while True:
            if len(cur.users) != 1:
                break
            nxt = next(iter(cur.users))
            if not nxt.args or nxt.args[0] is not cur:
                break
            m = mods.get(nxt.target) if nxt.op == "call_module" else None
            gone = _removed_join(nxt, gm, mods)
            if nxt.name in site_at or gone is not None:
                if join is not None:
                    break  # two activations in a row: not one removable join
                if gone is not None:
                    join, removed = gone[0], True
                    biased = biased or gone[1]
                else:
                    join = site_at[nxt.name]
            elif isinstance(m, _PASS):
                biased = biased or isinstance(m, nn.modules.batchnorm._BatchNorm)
            else:
                b = weight(nxt)
                if b is not None and join is not None and isinstance(a, nn.Linear) == isinstance(b, nn.Linear):
                    links[n] = (nxt, join, removed, biased)
                break
            cur = nxt
    has_prev = {v[0] for v in links.values()}
    chains = []
    for start in gm.graph.nodes:
        if start not in links or start in has_prev:
            continue
        nodes, sites, removed, biased = [start], [], [], []
        while nodes[-1] in links:
            nxt, join, rem, bias = links[nodes[-1]]
            sites.append(join)
            removed.append(rem)
            biased.append(bias)
            nodes.append(nxt)
        biased.append(False)
        shapes_in = [_shape(x.args[0]) for x in nodes]
        shapes_out = [_shape(x) for x in nodes]
        if any(s is None for s in shapes_in + shapes_out):
            continue
        chains.append(LayerChain([x.target for x in nodes], sites, removed, [mods[x.target] for x in nodes],
                                 shapes_in, shapes_out, biased))
    return chains


def _removed_join(n: fx.Node, gm: fx.GraphModule, mods: dict[str, nn.Module]) -> tuple[str, bool] | None:
    """``(site, has_shift)`` when ``n`` applies a linearised site's affine map, else None.

    The map is a :class:`ChannelAffine` module call, or the ``_channel_affine`` call of one that
    tracing went into (the graph module then holds only its ``scale``/``shift`` tensors, under
    the module's path, which is the site's name for a module site).
    """
    if n.op == "call_module" and isinstance(mods.get(n.target), ChannelAffine):
        m = mods[n.target]
        return m.site or n.target, bool(m.shift.detach().any())
    if n.op != "call_function" or n.target is not _channel_affine or len(n.args) < 3:
        return None
    scale, shift = n.args[1], n.args[2]
    if not all(isinstance(t, fx.Node) and t.op == "get_attr" for t in (scale, shift)):
        return None
    owner = mods.get(str(scale.target).rpartition(".")[0])
    site = owner.site if isinstance(owner, ChannelAffine) and owner.site else str(scale.target).rpartition(".")[0]
    try:
        has_shift = bool(gm.get_buffer(str(shift.target)).detach().any())
    except AttributeError:
        has_shift = True  # unknown: assume the map adds a bias (only makes exact planning stricter)
    return site, has_shift


def _with_bias(m: nn.Module) -> nn.Module:
    """A shallow stand-in for ``m`` that reports a non-zero bias (what BatchNorm folding gives it)."""
    if getattr(m, "bias", None) is not None and bool(m.bias.detach().any()):
        return m
    stand_in = copy.copy(m)
    params = dict(m._parameters)
    params["bias"] = torch.ones(m.weight.shape[0], dtype=m.weight.dtype, device=m.weight.device)
    object.__setattr__(stand_in, "_parameters", params)
    return stand_in


class _Saver:
    """Predicted savings of merged stretches of chains, memoised per stretch."""

    def __init__(self, exact: bool, cost: Callable[[LayerSpec], float]) -> None:
        self.exact = exact
        self.cost = cost
        self.memo: dict[tuple[int, int, int], float] = {}

    def stretch(self, k: int, chain: LayerChain, i: int, j: int) -> float:
        """Cost saved by the plan of ``chain.layers[i..j]`` (all joins between them removed)."""
        key = (k, i, j)
        if key not in self.memo:
            mods = [_with_bias(m) if self.exact and chain.biased[t] else m
                    for t, m in enumerate(chain.modules[i:j + 1], start=i)]
            p = plan_chain(mods, chain.in_shapes[i:j + 1], chain.out_shapes[i:j + 1], self.exact, self.cost)
            self.memo[key] = max(0.0, p["unmerged"] - p["cost"]) if p is not None else 0.0
        return self.memo[key]

    def chain(self, k: int, chain: LayerChain, gone: set[str]) -> float:
        """Cost saved on ``chain`` when the sites in ``gone`` are removed."""
        total, i = 0.0, 0
        n = len(chain.layers)
        while i < n - 1:
            if chain.sites[i] not in gone:
                i += 1
                continue
            j = i
            while j < n - 1 and chain.sites[j] in gone:
                j += 1
            total += self.stretch(k, chain, i, j)
            i = j
        return total


def _gone(chain: LayerChain, removed: Iterable[str]) -> set[str]:
    return {s for s, r in zip(chain.sites, chain.removed) if r} | set(removed)


def removal_groups(
    chains: list[LayerChain],
    cost: Callable[[LayerSpec], float],
    *,
    exact: bool = True,
    removed: Iterable[str] = (),
    max_group: int = 4,
) -> list[RemovalGroup]:
    """Every removal group of ``chains`` with the cost its removal saves.

    A group is a contiguous run (in the chain's order) of at most ``max_group`` live sites. Its
    saving is what the chain planner saves on the chain with the group removed, minus what it
    saves without it: the gain of this removal alone, given what is already gone.

    Args:
        chains: from :func:`layer_chains`.
        cost: prices a :class:`~egp_fast.folding.LayerSpec` (``egp_fast.folding.flops_cost``, a
            :class:`~egp_fast.folding.LatencyCost`, or your own callable).
        exact: plan as ``collapse(exact=...)`` would: True refuses border-inexact compositions.
        removed: sites to count as removed besides those already linearised.
        max_group: the most sites in one group.

    Returns:
        The groups, chain by chain, shorter runs first.

    Example:
        >>> import torch, egp_fast
        >>> from egp_fast.folding import flops_cost
        >>> from egp_fast.folding.groups import layer_chains, removal_groups
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
        >>> chains = layer_chains(egp_fast.discover_sites(net, torch.randn(2, 4)))
        >>> [(g.sites, g.saving) for g in removal_groups(chains, flops_cost)]  # 2 x 4x4 instead of 4x64 + 64x4
        [(['1'], 1984.0)]
    """
    saver = _Saver(exact, cost)
    metric = getattr(cost, "metric", "cost")
    removed = set(removed)
    out = []
    for k, chain in enumerate(chains):
        gone = _gone(chain, removed)
        live = [s for s in chain.sites if s not in gone]
        base = saver.chain(k, chain, gone)
        for size in range(1, min(max_group, len(live)) + 1):
            for a in range(len(live) - size + 1):
                group = live[a:a + size]
                saving = saver.chain(k, chain, gone | set(group)) - base
                out.append(RemovalGroup(group, list(chain.layers), max(0.0, saving), metric))
    return out


def predicted_speedup(
    graph: SiteGraph,
    cost: Callable[[LayerSpec], float],
    *,
    exact: bool = True,
    removed: Iterable[str] = (),
    chains: list[LayerChain] | None = None,
) -> dict[str, float]:
    """Predicted cost of the model's weight layers before and after collapse, and their ratio.

    The cost of the uncollapsed model is the sum of every priceable conv and linear layer; the
    collapsed model saves what the chain planner saves on each chain, with the sites already
    linearised and ``removed`` gone. Other operations (normalisation, activations, additions)
    are not priced, so the prediction ranks choices; the measured speed-up tells the truth.

    Args:
        graph: the model's :class:`~egp_fast.SiteGraph`.
        cost: as for :func:`removal_groups`.
        exact: as for :func:`removal_groups`.
        removed: sites to count as removed besides those already linearised.
        chains: :func:`layer_chains` of ``graph`` when already computed.

    Returns:
        ``{"before": cost, "after": cost, "speedup": before / after}`` (speed-up 1.0 when
        nothing can be priced).

    Example:
        >>> import torch, egp_fast
        >>> from egp_fast.folding import flops_cost
        >>> from egp_fast.folding.groups import predicted_speedup
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
        >>> graph = egp_fast.discover_sites(net, torch.randn(2, 4))
        >>> predicted_speedup(graph, flops_cost, removed=["1"])["speedup"]
        32.0
    """
    gm = graph.graph_module
    if gm is None:
        return {"before": 0.0, "after": 0.0, "speedup": 1.0}
    mods = dict(gm.named_modules())
    specs = []
    for n in gm.graph.nodes:
        m = mods.get(n.target) if n.op == "call_module" else None
        if isinstance(m, _WEIGHTS) and n.args:
            i, o = _shape(n.args[0]), _shape(n)
            spec = layer_spec(m, i, o) if i is not None and o is not None else None
            if spec is not None:
                specs.append(spec)
    if hasattr(cost, "measure"):
        cost.measure(specs)
    before = float(sum(cost(s) for s in specs))
    chains = layer_chains(graph) if chains is None else chains
    saver = _Saver(exact, cost)
    removed = set(removed)
    saving = sum(saver.chain(k, c, _gone(c, removed)) for k, c in enumerate(chains))
    after = before - saving
    return {"before": before, "after": after, "speedup": before / after if after > 0 else 1.0}
