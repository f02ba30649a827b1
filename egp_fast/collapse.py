"""Collapse: remove zero-entropy sites and fold the affine layers around them.

``collapse(model, stats, example_inputs)`` returns a new, shallower model (the input model is
never modified): each zero-entropy site (EGP.md, "Collapse") becomes its per-channel affine map
(:mod:`egp_fast.collapse_affine`), then the passes of :mod:`egp_fast.collapse_fold` fold
BatchNorm, the affine maps, compose the layers around removed sites, merge residual
shortcuts, replace dead branches by constants and drop dead channels. The result is an
``fx.GraphModule``: it runs, pickles, and works with ``torch.compile``.

Depth is reported before and after: nonlinear sites, weight layers on the longest
input-to-output path, parameters, FLOPs (``torch.utils.flop_counter``) and measured CPU
latency at batch 1 and 64 (median of repeated runs).
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from egp_fast.collapse_affine import ChannelAffine, _linearize, _selected, linearize, site_affine
from egp_fast.collapse_fold import Folder, normalise_wrapped_affines
from egp_fast.errors import ConfigError, ModelError
from egp_fast.graph import WEIGHT_TYPES, _unwrap, discover_sites, eval_mode, normalize_inputs, trace

__all__ = ["ChannelAffine", "CollapseResult", "collapse", "depth_report", "linearize"]

FOLD_MODES = ("auto", "always", "never")


@dataclass
class CollapseResult:
    """What :func:`collapse` built and removed.

    Attributes:
        model: the collapsed model (an ``fx.GraphModule``, eval mode, masks stripped).
        removed: one dict per change: ``kind`` (``linearize``, ``bn_fold``, ``compose_conv``,
            ``compose_linear``, ``residual_identity``, ``residual_parallel``, ``dead_branch``,
            ``dead_channels``, ``dead_code``: a site inside a branch whose output became
            unused), ``site`` or ``layers``, and ``exact``.
        left: what was not done, with ``reason`` (unsupported pattern, cost, border effects).
        before: depth report of the input model (see :func:`depth_report`).
        after: depth report of the collapsed model.
        exact: True when every change is exact (no approximate site, no border-inexact merge).
        max_deviation: max |output difference| on ``example_inputs``.
        relative_deviation: ``max_deviation`` over the max |output| of the input model.
    """

    model: nn.Module
    removed: list[dict[str, Any]] = field(default_factory=list)
    left: list[dict[str, Any]] = field(default_factory=list)
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    exact: bool = True
    max_deviation: float = 0.0
    relative_deviation: float = 0.0

    @property
    def removed_sites(self) -> list[str]:
        """Names of the sites that are gone."""
        return [e["site"] for e in self.removed if e["kind"] == "linearize"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (everything but the model)."""
        return {
            "removed": [dict(e) for e in self.removed],
            "left": [dict(e) for e in self.left],
            "before": dict(self.before),
            "after": dict(self.after),
            "exact": self.exact,
            "max_deviation": self.max_deviation,
            "relative_deviation": self.relative_deviation,
        }

    def table(self) -> str:
        """A markdown before/after table of the depth report."""
        rows = [
            ("nonlinear sites", "sites", "{:d}"),
            ("weight layers on the longest path", "longest_path", "{:d}"),
            ("weight layer calls", "weight_layers", "{:d}"),
            ("parameters", "params", "{:,d}"),
            ("FLOPs", "flops", "{:,d}"),
            ("latency batch 1 (ms)", "latency_ms_b1", "{:.2f}"),
            ("latency batch 64 (ms)", "latency_ms_b64", "{:.1f}"),
        ]
        out = ["| | before | after | after / before |", "|---|---:|---:|---:|"]
        for label, key, fmt in rows:
            a, b = self.before.get(key), self.after.get(key)
            if a is None or b is None:
                continue
            ratio = f"{b / a:.3f}" if a else "-"
            out.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {ratio} |")
        return "\n".join(out)


def collapse(
    model: nn.Module,
    stats: Any,
    example_inputs: Any,
    exact: bool = True,
    fold: str = "auto",
    measure_latency: bool = True,
    sites: list[str] | None = None,
) -> CollapseResult:
    """Remove the zero-entropy sites of ``model`` and fold the layers around them.

    Args:
        model: the (pruned) network; it is not modified (a deep copy is collapsed).
        stats: :class:`egp_fast.stats.EntropyStats` measured on this model. Only sites whose
            every channel is constant (``collapsible``) are touched.
        example_inputs: a batch the model accepts (tensor, tuple or dict), used to trace,
            for shapes, FLOPs, latency and to measure the output deviation.
        exact: True (default) allows only changes that keep every output (up to rounding).
            False also composes two zero-padded convs, which is exact only away from the
            border; the deviation is measured on ``example_inputs`` and reported.
        fold: ``"auto"`` composes two layers only when the merged layer costs no more FLOPs
            than the pair; ``"always"`` composes whenever it is possible; ``"never"`` only
            removes the sites (folding them into neighbouring layers' scale/bias).
        measure_latency: time CPU latency at batch 1 and 64 before and after (seconds).
        sites: only these sites (default: every collapsible site in ``stats``).

    Returns:
        :class:`CollapseResult`.

    Raises:
        ConfigError: bad ``fold``, or ``sites`` names a site ``stats`` does not have.
        DataError: the model rejects ``example_inputs``.

    Example:
        >>> import torch, egp_fast
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> net[0].bias.data += 100.0
        >>> stats = egp_fast.measure_entropy(net, [torch.randn(32, 4)], progress=False)
        >>> out = egp_fast.collapse(net, stats, torch.randn(2, 4), measure_latency=False)
        >>> out.after["sites"], out.after["longest_path"]
        (0, 1)
    """
    if fold not in FOLD_MODES:
        raise ConfigError(f"fold={fold!r}; use one of {FOLD_MODES}")
    model = _unwrap(model)
    chosen = _selected(stats, sites)
    before = depth_report(model, example_inputs, measure_latency)
    work = _plain_copy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            graph = discover_sites(work, example_inputs)
        except ModelError:
            graph = None
    left: list[dict[str, Any]] = []
    removed: list[dict[str, Any]] = []
    if (graph is not None and not graph.traced) or (graph is None and not _traceable(work)):
        # fx cannot see into the model: only swap single-call activation modules, fold nothing.
        why = "; ".join(str(w.message)[:200] for w in caught) or "torch.fx could not trace the model"
        done, refused = _linearize(work, stats, list(chosen))
        removed = [_site_entry(chosen[n], None) for n in done]
        left = [{"site": n, "reason": r} for n, r in refused]
        left.append({"kind": "fold", "reason": f"nothing folded: {why}"})
        result_model = work
    else:
        gm = graph.graph_module if graph is not None else _traced_with_shapes(work, example_inputs)
        site_nodes = {s.node: s.name for s in graph.sites} if graph is not None else {}
        folder = Folder(gm, exact, fold, site_nodes)
        for aff in normalise_wrapped_affines(gm):
            folder.removed.append({"kind": "linearize", "site": aff.site, "exact": aff.exact,
                                   "note": "linearised earlier (egp_fast.linearize)"})
        if graph is not None:
            _linearize_graph(gm, graph, stats, chosen, folder)
        folder.run()
        removed, left = folder.removed, folder.left
        result_model = gm
    result_model.eval()
    dev, rel = _deviation(model, result_model, example_inputs)
    after = depth_report(result_model, example_inputs, measure_latency)
    is_exact = all(e.get("exact", True) for e in removed)
    return CollapseResult(result_model, removed, left, before, after, is_exact, dev, rel)


def _traceable(model: nn.Module) -> bool:
    try:
        trace(model)
        return True
    except Exception:
        return False


def _traced_with_shapes(model: nn.Module, example_inputs: Any) -> fx.GraphModule:
    # No site left (discover_sites raised ModelError): still fold earlier linearisations and BN.
    from egp_fast.graph import _propagate_shapes

    gm = trace(model)
    args, kwargs = normalize_inputs(example_inputs)
    _propagate_shapes(model, gm, args, kwargs)
    return gm


def _plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy with masks applied and stripped and masked layers turned into plain ones."""
    work = copy.deepcopy(model)
    from egp_fast import masks as _masks

    for name, m in list(work.named_modules()):
        mask = getattr(m, "weight_mask", None)
        if isinstance(mask, torch.Tensor) and isinstance(getattr(m, "weight", None), torch.Tensor):
            with torch.no_grad():
                m.weight.mul_(mask.to(m.weight.dtype))
        if isinstance(m, nn.Linear) and type(m) is not nn.Linear and name:
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                              device=m.weight.device, dtype=m.weight.dtype)
            with torch.no_grad():
                plain.weight.copy_(m.weight)
                if m.bias is not None:
                    plain.bias.copy_(m.bias)
            parent, _, attr = name.rpartition(".")
            setattr(work.get_submodule(parent) if parent else work, attr, plain)
    _masks.strip_masks(work)
    work.eval()
    return work


def _site_entry(st: Any, site: Any) -> dict[str, Any]:
    piece = st.piece
    return {
        "kind": "linearize",
        "site": st.name,
        "activation": st.kind,
        "exact": bool(st.exact),
        "channels": int(piece.numel()),
        "always_off": int((piece == 0).sum()),
        "identity": int((piece == 1).sum()),
        "saturated": int((piece == 2).sum()),
    }


def _linearize_graph(gm: fx.GraphModule, graph: Any, stats: Any, chosen: dict[str, Any], folder: Folder) -> None:
    g = gm.graph
    nodes = {n.name: n for n in g.nodes}
    present = {s.name for s in graph.sites}
    for name in chosen:
        if name not in present:
            folder.left.append({"site": name, "reason": "no such site in the model (stale statistics?)"})
    for site in graph.sites:
        if site.name not in chosen:
            continue
        st = chosen[site.name]
        if st.kind != site.kind or int(st.piece.numel()) != site.channels:
            folder.left.append({"site": site.name, "reason": f"statistics ({st.kind}, {st.piece.numel()} channels) "
                                f"do not match the model ({site.kind}, {site.channels} channels)"})
            continue
        node = nodes[site.node]
        inp = node.args[0] if node.args else node.kwargs.get("input")
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        inplace = bool(getattr(mod, "inplace", False)) or node.kwargs.get("inplace", False) or (
            isinstance(node.target, str) and node.target.endswith("_")
        ) or getattr(node.target, "__name__", "").endswith("_")
        if inplace and len(inp.users) > 1:
            folder.left.append({"site": site.name, "reason": "in-place activation whose input is also read elsewhere"})
            continue
        prelu_w = None
        if site.kind == "prelu":
            if mod is not None:
                prelu_w = mod.weight
            else:
                w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
                if not (isinstance(w, fx.Node) and w.op == "get_attr"):
                    folder.left.append({"site": site.name, "reason": "PReLU slopes are not a module attribute"})
                    continue
                prelu_w = gm.get_parameter(w.target)
        ref = inp.meta.get("egp_shape")
        dtype = next((p.dtype for p in gm.parameters() if p.is_floating_point()), torch.float32)
        device = next((p.device for p in gm.parameters()), torch.device("cpu"))
        scale, shift = site_affine(site.kind, st.piece, site.params, prelu_w, dtype=dtype)
        aff = ChannelAffine(scale.to(device), shift.to(device), site.channel_dim, site.exact, site.name)
        with g.inserting_after(node):
            new = g.call_module(folder.add(aff, "egp_lin"), (inp,))
        new.meta["egp_shape"] = node.meta.get("egp_shape", ref)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        folder.removed.append(_site_entry(st, site))


def _deviation(original: nn.Module, collapsed: nn.Module, example_inputs: Any) -> tuple[float, float]:
    args, kwargs = normalize_inputs(example_inputs)
    with eval_mode(original), eval_mode(collapsed):
        ref = [t for t in tree_leaves(original(*args, **kwargs)) if isinstance(t, torch.Tensor)]
        out = [t for t in tree_leaves(collapsed(*args, **kwargs)) if isinstance(t, torch.Tensor)]
    if len(ref) != len(out) or any(a.shape != b.shape for a, b in zip(ref, out)):
        raise ModelError("collapse changed the model's output structure; please report this model")
    dev = max((float((a.double() - b.double()).abs().max()) for a, b in zip(ref, out) if a.numel()), default=0.0)
    scale = max((float(a.double().abs().max()) for a in ref if a.numel()), default=0.0)
    return dev, dev / scale if scale > 0 else dev


# --------------------------------------------------------------------------------------------
# Depth report.


def _longest_path(model: nn.Module, gm: fx.GraphModule | None = None) -> tuple[int | None, int | None]:
    if gm is None:
        try:
            gm = trace(model)
        except Exception:
            return None, None
    mods = dict(gm.named_modules())
    depth: dict[fx.Node, int] = {}
    calls = 0
    for n in gm.graph.nodes:
        w = 1 if n.op == "call_module" and isinstance(mods.get(n.target), WEIGHT_TYPES) else 0
        calls += w
        depth[n] = w + max((depth[p] for p in n.all_input_nodes), default=0)
    return max(depth.values(), default=0), calls


def _batched(example_inputs: Any, b: int) -> tuple[tuple, dict]:
    args, kwargs = normalize_inputs(example_inputs)

    def rep(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] >= 1:
            return v[:1].expand(b, *v.shape[1:]).contiguous()
        return v

    return tuple(rep(a) for a in args), {k: rep(v) for k, v in kwargs.items()}


def _latency_ms(model: nn.Module, example_inputs: Any, b: int, budget_s: float, max_runs: int = 15) -> float:
    args, kwargs = _batched(example_inputs, b)
    with eval_mode(model):
        model(*args, **kwargs)  # warm-up: allocator, lazy init
        times = []
        start = time.perf_counter()
        while len(times) < max_runs and (len(times) < 3 or time.perf_counter() - start < budget_s):
            t0 = time.perf_counter()
            model(*args, **kwargs)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def depth_report(model: nn.Module, example_inputs: Any, measure_latency: bool = True) -> dict[str, Any]:
    """Depth and cost of ``model`` on ``example_inputs``.

    Args:
        model: any network.
        example_inputs: a batch it accepts; FLOPs are counted on it as given.
        measure_latency: also time it on this machine's CPU threads at batch 1 and 64
            (the first sample repeated; median of up to 15 runs after a warm-up).

    Returns:
        dict with ``sites`` (nonlinear sites), ``longest_path`` (weight layers on the
        longest input-to-output path; None if fx cannot trace), ``weight_layers`` (weight
        layer calls), ``params``, ``nonzero_params``, ``flops`` and, when measured,
        ``latency_ms_b1``, ``latency_ms_b64`` and ``threads``.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> depth_report(net, torch.randn(2, 4), measure_latency=False)["longest_path"]
        2
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = _unwrap(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = None
        try:
            found = discover_sites(model, example_inputs)
            n_sites, gm = len(found.sites), found.graph_module
        except ModelError:
            n_sites = 0
    longest, calls = _longest_path(model, gm)
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    args, kwargs = normalize_inputs(example_inputs)
    with eval_mode(model):
        with FlopCounterMode(display=False) as fc:
            model(*args, **kwargs)
    rep: dict[str, Any] = {
        "sites": n_sites,
        "longest_path": longest,
        "weight_layers": calls,
        "params": int(params),
        "nonzero_params": int(nonzero),
        "flops": int(fc.get_total_flops()),
    }
    if measure_latency:
        rep["latency_ms_b1"] = _latency_ms(model, example_inputs, 1, budget_s=1.0)
        rep["latency_ms_b64"] = _latency_ms(model, example_inputs, 64, budget_s=4.0, max_runs=7)
        rep["threads"] = torch.get_num_threads()
    return rep
