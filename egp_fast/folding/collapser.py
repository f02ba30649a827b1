"""Collapse: remove zero-entropy sites and fold the affine layers around them.

``collapse(model, stats, example_inputs)`` returns a new, shallower model (the input model is
never modified): each zero-entropy site (docs/algorithm.md, "Collapse") becomes its per-channel affine map
(:mod:`egp_fast.folding.affine`), then the passes of :mod:`egp_fast.folding.fold` fold
BatchNorm, the affine maps, compose the layers around removed sites, merge residual
shortcuts, replace dead branches by constants and drop dead channels. The result is an
``fx.GraphModule``: it runs, pickles, and works with ``torch.compile``.

Depth is reported before and after (:func:`egp_fast.folding.depth_report`): nonlinear sites,
weight layers on the longest input-to-output path, parameters, FLOPs and, when asked, the
latency of both models timed interleaved (:func:`egp_fast.folding.compare_latency`).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from egp_fast.errors import ConfigError, ModelError
from egp_fast.folding.affine import ChannelAffine, site_affine
from egp_fast.folding.depth import depth_report
from egp_fast.folding.evidence import affine_gaps, check_max_flip, evidence, observed_flips, weak_reason
from egp_fast.folding.fold import Folder, normalise_wrapped_affines
from egp_fast.folding.latency import compare_latency
from egp_fast.folding.linearizer import _selected, linearize_sites
from egp_fast.folding.plain import _plain_copy
from egp_fast.folding.plan import LatencyCost
from egp_fast.graph import discover_sites, eval_mode, normalize_inputs, propagate_shapes, trace, unwrap_model

__all__ = ["CollapseResult", "collapse"]

FOLD_MODES = ("auto", "always", "never", "latency")


@dataclass
class CollapseResult:
    """What :func:`collapse` built and removed.

    Attributes:
        model: the collapsed model (an ``fx.GraphModule``, eval mode, masks stripped). Its
            weights are ordinary ``nn.Parameter`` objects (``requires_grad=True``), so it can be
            fine-tuned, deep-copied, moved with ``.to(device)`` and saved with ``state_dict``.
        removed: one dict per change: ``kind`` (``linearize``, ``bn_fold``, ``compose_conv``,
            ``compose_linear``, ``residual_identity``, ``residual_parallel``, ``dead_branch``,
            ``dead_channels``, ``dead_code``: a site inside a branch whose output became
            unused), ``site`` or ``layers``, and ``exact``. ``linearize`` entries also carry the
            evidence: ``samples`` and ``flip_bound`` (None when the statistics do not say),
            ``held_out`` (see ``check``) when held-out data was given, and ``composed``: whether
            the layers around the site were merged into one.
        left: what was not done, with ``reason`` (weak evidence, unsupported pattern, cost,
            border effects). Sites kept for weak evidence have ``kind="evidence"``,
            ``samples``, ``flip_bound``, ``max_flip`` and ``confidence``; GELU/SiLU sites kept
            because ``exact=True`` have ``kind="approximate"``, ``gap`` and ``range``.
        before: depth report of the input model (see :func:`depth_report`).
        after: depth report of the collapsed model.
        exact: True when every change is exact (no approximate site, no border-inexact merge).
        max_deviation: max |output difference| on ``example_inputs``.
        relative_deviation: ``max_deviation`` over the max |output| of the input model.
        latency: :func:`compare_latency` of the input model (``a``) and the collapsed one
            (``b``), measured interleaved; empty when ``measure_latency=False``.
        check: site -> observed flips on the held-out data (``samples``, ``flipped_samples``,
            ``flip_rate``, ``channels_changed``, ``channels``, ``per="sample"``); empty without
            ``check=``.
        settings: the arguments that decided the result (``exact``, ``fold``, ``max_flip``,
            ``confidence``), echoed so the run can be repeated.
        plan: the chain plan of ``fold="auto"``/``"latency"``: ``metric`` (``flops``, ``ms`` or
            ``cost``), ``chains`` (per maximal run of layers joined by removed sites: ``layers``,
            the merged ``segments``, ``predicted`` and ``unmerged`` cost, ``segment_costs``,
            ``border_refused``, ``residual``: the plan absorbs the chain's residual addition),
            ``predicted_total``/``unmerged_total`` over the chains and, when latency was
            measured, ``measured`` (milliseconds before/after at each batch size). Under
            ``"latency"`` each chain also gives the FLOPs plan (``reference_segments``, its
            predicted ``reference`` time, ``saving``, ``noise``, ``departed``); when a chain
            departed, ``confirm`` holds the interleaved timing of the two collapsed models and
            ``used`` says which was kept (``"auto"`` with ``fallback``, the reason, and
            ``auto_chains`` when the latency plan was not faster).
    """

    model: nn.Module
    removed: list[dict[str, Any]] = field(default_factory=list)
    left: list[dict[str, Any]] = field(default_factory=list)
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    exact: bool = True
    max_deviation: float = 0.0
    relative_deviation: float = 0.0
    latency: dict[str, Any] = field(default_factory=dict)
    check: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)

    @property
    def removed_sites(self) -> list[str]:
        """Names of the sites that are gone."""
        return [e["site"] for e in self.removed if e["kind"] == "linearize"]

    @property
    def weak_sites(self) -> list[str]:
        """Zero-entropy sites left in place because their flip bound exceeds ``max_flip``."""
        return [e["site"] for e in self.left if e.get("kind") == "evidence"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (everything but the model)."""
        lat = copy.deepcopy(self.latency)
        if "batches" in lat:
            lat["batches"] = {str(k): v for k, v in lat["batches"].items()}
        return {
            "removed": [copy.deepcopy(e) for e in self.removed],
            "left": [copy.deepcopy(e) for e in self.left],
            "before": dict(self.before),
            "after": dict(self.after),
            "exact": self.exact,
            "max_deviation": self.max_deviation,
            "relative_deviation": self.relative_deviation,
            "latency": lat,
            "check": copy.deepcopy(self.check),
            "settings": dict(self.settings),
            "plan": copy.deepcopy(self.plan),
        }

    def table(self) -> str:
        """A markdown before/after table of the depth report (latency measured interleaved)."""
        rows = [
            ("nonlinear sites", "sites", "{:d}"),
            ("weight layers on the longest path", "longest_path", "{:d}"),
            ("weight layer calls", "weight_layers", "{:d}"),
            ("parameters", "params", "{:,d}"),
            ("FLOPs", "flops", "{:,d}"),
        ]
        out = ["| | before | after | after / before |", "|---|---:|---:|---:|"]
        for label, key, fmt in rows:
            a, b = self.before.get(key), self.after.get(key)
            if a is None or b is None:
                continue
            ratio = f"{b / a:.3f}" if a else "-"
            out.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {ratio} |")
        for bs, row in (self.latency.get("batches") or {}).items():
            lo, hi = row["speedup_iqr"]
            note = " (inside the noise)" if row["inside_noise"] else ""
            out.append(f"| latency batch {bs} (ms, median) | {row['a_ms']:.2f} | {row['b_ms']:.2f} | "
                       f"{1 / row['speedup']:.3f}; speed-up {row['speedup']:.2f}x, IQR {lo:.2f}-{hi:.2f}{note} |")
        return "\n".join(out)


def collapse(
    model: nn.Module,
    stats: Any,
    example_inputs: Any,
    exact: bool = True,
    fold: str = "auto",
    measure_latency: bool = True,
    sites: list[str] | None = None,
    *,
    max_flip: float = 0.01,
    confidence: float = 0.95,
    check: Any = None,
    cost: Any = None,
) -> CollapseResult:
    """Remove the zero-entropy sites of ``model`` and fold the layers around them.

    A site is removed only when the evidence is strong enough: its upper confidence bound on
    the probability that a new sample flips it (``SiteStats.flip_bound(confidence)``; with no
    flip in ``n`` samples, ``1 - (1 - confidence) ** (1 / n)``, about ``3 / n``) must be at most
    ``max_flip``. Weaker sites stay, listed in ``.left`` with the numbers ("seen on 8 samples:
    flip bound 31.2% > 1% ..."). Activations already replaced by ``egp_fast.linearize`` (or the
    EASIER loop) are folded whatever the evidence: that decision was made earlier.

    Fine-tuning the folded model (fold-then-finetune): ``out.model`` is trainable as it is.
    Folding composes the layers around removed sites into new dense layers (masks are stripped;
    BatchNorm is folded into the conv before it, so training updates the folded weights without
    batch statistics; dropout is removed). Recipe::

        out = egp_fast.collapse(model, stats, x, exact=False, fold="always")
        net = out.model.train()          # a GraphModule; parameters require grad
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
        for xb, yb in loader:            # a few epochs at a small learning rate
            opt.zero_grad(); F.cross_entropy(net(xb), yb).backward(); opt.step()
        net.eval()                       # evaluate; save with torch.save(net.state_dict(), ...)

    Args:
        model: the (pruned) network; it is not modified (a deep copy is collapsed).
        stats: :class:`egp_fast.measurement.EntropyStats` measured on this model. Only sites whose
            every channel is constant (``collapsible``) are touched.
        example_inputs: a batch the model accepts (tensor, tuple or dict), used to trace,
            for shapes, FLOPs, latency and to measure the output deviation.
        exact: True (default) allows only changes that keep every output (up to rounding): a
            zero-entropy GELU/SiLU site is removed only where its affine map matches it to
            float rounding on ``example_inputs`` (inputs far from 0), else it is left (in
            ``left``, ``kind="approximate"``, with the measured ``gap``). False removes those
            too and composes two zero-padded convs, which is exact only away from the border;
            the deviation is measured on ``example_inputs`` and reported.
        fold: ``"auto"`` plans every maximal run of layers joined by removed sites as a whole
            (:mod:`egp_fast.folding.plan`: dynamic programming over split points) and merges the
            segments that minimise FLOPs, never more than leaving the layers apart;
            ``"latency"`` does the same with each candidate layer timed on the model's device
            (:class:`egp_fast.folding.LatencyCost`), departs from the FLOPs plan only for a
            saving above the timing noise, and keeps the result only when it is measurably
            faster than the ``"auto"`` collapse (both timed interleaved; otherwise the
            ``"auto"`` model is returned, see ``plan["fallback"]``); ``"always"`` composes whenever it is
            possible; ``"never"`` only removes the sites (folding them into neighbouring layers'
            scale/bias).
        measure_latency: time the input and the collapsed model at batch 1 and 64,
            interleaved (:func:`compare_latency`; a few seconds).
        sites: only these sites (default: every collapsible site in ``stats``).
        max_flip: largest tolerated flip bound, in (0, 1]; ``1.0`` collapses every zero-entropy
            site whatever the number of samples behind it.
        confidence: confidence level of the flip bound, in (0, 1).
        check: optional held-out data (an iterable of batches, as
            :func:`egp_fast.measure_entropy` takes): the original model is run on it and, per
            removed site, the fraction of held-out samples on which any neuron left its piece
            is reported (``removed[i]["held_out"]``, ``result.check``).
        cost: what the chain plan minimises, a callable ``LayerSpec -> float``
            (:class:`egp_fast.folding.LayerSpec`: the layer that would be built and its input
            shape). Default: FLOPs for ``"auto"``, a :class:`egp_fast.folding.LatencyCost` on the
            model's device for ``"latency"``. A planted table makes a test deterministic; under
            ``"latency"`` it may define ``noise(spec)``, ``margin``, ``add(shape)`` and
            ``confirm(auto_model, latency_model, example_inputs) -> {"faster": bool, ...}`` as
            :class:`~egp_fast.folding.LatencyCost` does (without ``confirm`` the two models are
            timed).

    Returns:
        :class:`CollapseResult`.

    Raises:
        ConfigError: bad ``fold``, ``max_flip`` or ``confidence``, or ``sites`` names a site
            ``stats`` does not have.
        DataError: the model rejects ``example_inputs`` or a ``check`` batch.

    Example:
        >>> import torch, egp_fast
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> net[0].bias.data += 100.0
        >>> stats = egp_fast.measure_entropy(net, [torch.randn(512, 4)], progress=False)
        >>> out = egp_fast.collapse(net, stats, torch.randn(2, 4), measure_latency=False)
        >>> out.after["sites"], out.after["longest_path"]
        (0, 1)
        >>> few = egp_fast.measure_entropy(net, [torch.randn(8, 4)], progress=False)
        >>> weak = egp_fast.collapse(net, few, torch.randn(2, 4), measure_latency=False)
        >>> weak.weak_sites, weak.left[0]["reason"][:40]
        (['1'], 'seen on 8 samples: flip bound 31.2% > 1%')
    """
    if fold not in FOLD_MODES:
        raise ConfigError(f"fold={fold!r}; use one of {FOLD_MODES}")
    check_max_flip(max_flip)
    model = unwrap_model(model)
    chosen = _selected(stats, sites)
    # Sites linearised earlier (egp_fast.linearize, the EASIER loop) are folded below whatever
    # the statistics say: that decision was already made.
    earlier = {m.site for m in model.modules() if isinstance(m, ChannelAffine) and m.site}
    evid: dict[str, tuple[int | None, float | None]] = {}
    weak: list[dict[str, Any]] = []
    for name, st in list(chosen.items()):
        if name in earlier:
            del chosen[name]
            continue
        n, bound = evidence(st, confidence)
        evid[name] = (n, bound)
        why = weak_reason(name, n, bound, max_flip, confidence)
        if why is not None:
            del chosen[name]
            weak.append({"site": name, "kind": "evidence", "samples": n, "flip_bound": bound,
                         "max_flip": max_flip, "confidence": confidence, "reason": why})
    settings = {"exact": exact, "fold": fold, "max_flip": max_flip, "confidence": confidence,
                "check": check is not None}
    before = depth_report(model, example_inputs, False)
    work = _plain_copy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            graph = discover_sites(work, example_inputs)
        except ModelError:
            graph = None
    smooth = {n: st for n, st in chosen.items() if not st.exact}
    verified: set[str] = set()
    if exact and smooth and graph is not None:
        # Zero entropy puts every GELU/SiLU input on one side of 0, where the function is still
        # curved: exact=True removes such a site only where its affine map matches it to float
        # rounding on the example inputs (far from 0).
        dtype = _device_dtype(work)[1]
        rounding = 8 * torch.finfo(dtype if dtype is not None and dtype.is_floating_point else torch.float32).eps
        for name, gap in affine_gaps(work, graph, smooth, example_inputs).items():
            if gap["gap"] <= rounding * gap["range"]:
                verified.add(name)  # removing it keeps the outputs: reported exact
            else:
                del chosen[name]
                weak.append({"site": name, "kind": "approximate", "gap": gap["gap"], "range": gap["range"],
                             "reason": (f"{smooth[name].kind} is not affine on example_inputs: its replacement "
                                        f"would be off by up to {gap['gap']:.3g} (its values reach "
                                        f"{gap['range']:.3g}); pass exact=False to remove it (the deviation "
                                        "is measured and reported)")})
    checks: dict[str, dict[str, Any]] = {}
    if check is not None and graph is not None and chosen:
        checks = observed_flips(work, graph, chosen, check)
    left: list[dict[str, Any]] = []
    removed: list[dict[str, Any]] = []
    plan: dict[str, Any] = {}
    if (graph is not None and not graph.traced) or (graph is None and not _traceable(work)):
        # fx cannot see into the model: only swap single-call activation modules, fold nothing.
        why = "; ".join(str(w.message)[:200] for w in caught) or "torch.fx could not trace the model"
        done, refused = linearize_sites(work, stats, list(chosen))
        # what the traced path reports too: the sites linearised before (nothing folds them here)
        removed = [{"kind": "linearize", "site": m.site, "exact": True, "linearization_exact": m.exact,
                    "how": m.how, "note": "linearised earlier (egp_fast.linearize)"}
                   for m in work.modules() if isinstance(m, ChannelAffine) and m.site in earlier]
        removed += [_site_entry(chosen[n], n in verified) for n in done]
        left = [{"site": n, "reason": r} for n, r in refused]
        left.append({"kind": "fold", "reason": f"nothing folded: {why}"})
        result_model = work
    else:
        gm = graph.graph_module if graph is not None else _traced_with_shapes(work, example_inputs)
        site_nodes = {s.node: s.name for s in graph.sites} if graph is not None else {}
        if cost is None and fold == "latency":
            cost = LatencyCost(*_device_dtype(work))
        folder = Folder(gm, exact, fold, site_nodes, cost)
        known = {n: m for n, m in work.named_modules() if isinstance(m, ChannelAffine)}
        for aff in normalise_wrapped_affines(gm, known):
            # The function changed when the site was linearised (``linearization_exact``); folding
            # the map that is now in the model is exact.
            folder.removed.append({"kind": "linearize", "site": aff.site, "exact": True,
                                   "linearization_exact": aff.exact, "how": aff.how,
                                   "note": "linearised earlier (egp_fast.linearize)"})
        # One inside a module the trace keeps whole (an encoder fx cannot follow) is not a node:
        # the activation is gone all the same, nothing folds it.
        seen = {e["site"] for e in folder.removed}
        for m in known.values():
            if m.site in earlier and m.site not in seen:
                seen.add(m.site)
                folder.removed.append({"kind": "linearize", "site": m.site, "exact": True,
                                       "linearization_exact": m.exact, "how": m.how,
                                       "note": "linearised earlier (egp_fast.linearize); inside a module the "
                                               "trace keeps whole, so it is not folded"})
        if graph is not None:
            _linearize_graph(gm, graph, stats, chosen, folder, verified)
        folder.run()
        removed, left = folder.removed, folder.left
        if fold in ("auto", "latency"):
            metric = getattr(folder.cost, "metric", "cost")
            plan = {"metric": metric, "chains": folder.plan,
                    "predicted_total": sum(c["predicted"] for c in folder.plan),
                    "unmerged_total": sum(c["unmerged"] for c in folder.plan)}
        result_model = gm
        # Whether the layers around each removed site became one layer (a gated MLP, a
        # zero-padded pair with exact=True or a costlier merge leaves them apart).
        composed = {s for e in removed if e["kind"] in ("compose_linear", "compose_conv") for s in e.get("sites", ())}
        for e in removed:
            if e["kind"] == "linearize":
                e["composed"] = e["site"] in composed
    if fold == "latency" and any(c.get("departed") for c in plan.get("chains", ())):
        # Never slower than the FLOPs plan: build it too, time both interleaved, keep the faster.
        ref = collapse(model, stats, example_inputs, exact, "auto", False, sites, max_flip=max_flip,
                       confidence=confidence)
        judge = getattr(cost, "confirm", None) or LatencyCost(*_device_dtype(work)).confirm
        plan["confirm"] = judge(ref.model, result_model, example_inputs)
        if not plan["confirm"]["faster"]:
            result_model, removed = ref.model, ref.removed
            left = [e for e in ref.left if e.get("kind") not in ("evidence", "approximate")]
            plan.update(used="auto", auto_chains=ref.plan.get("chains", []),
                        fallback="the latency plan was not faster than the FLOPs plan (fold='auto') beyond "
                                 "the noise when the two collapsed models were timed interleaved: kept the latter")
    if fold == "latency":
        plan.setdefault("used", "latency")
    for e in removed:
        if e["kind"] == "linearize" and e["site"] in evid:
            e["samples"], e["flip_bound"] = evid[e["site"]]
            if e["site"] in checks:
                e["held_out"] = checks[e["site"]]
    left = weak + left
    result_model.eval()
    dev, rel = _deviation(model, result_model, example_inputs)
    after = depth_report(result_model, example_inputs, False)
    latency: dict[str, Any] = {}
    if measure_latency:
        latency = compare_latency(model, result_model, example_inputs)
        for bs, row in latency["batches"].items():
            before[f"latency_ms_b{bs}"], after[f"latency_ms_b{bs}"] = row["a_ms"], row["b_ms"]
        before["threads"] = after["threads"] = latency["threads"]
        if plan:
            plan["measured"] = {str(bs): {"before_ms": row["a_ms"], "after_ms": row["b_ms"]}
                                for bs, row in latency["batches"].items()}
    is_exact = all(e.get("exact", True) for e in removed)
    return CollapseResult(result_model, removed, left, before, after, is_exact, dev, rel, latency,
                          checks, settings, plan)


def _device_dtype(model: nn.Module) -> tuple[Any, Any]:
    p0 = next(model.parameters(), None)
    return (p0.device, p0.dtype) if p0 is not None else (None, None)


def _traceable(model: nn.Module) -> bool:
    try:
        with eval_mode(model):
            trace(model)
        return True
    except Exception:
        return False


def _traced_with_shapes(model: nn.Module, example_inputs: Any) -> fx.GraphModule:
    # No site left (discover_sites raised ModelError): still fold earlier linearisations and BN.
    with eval_mode(model):  # as discovery traces: no training branch frozen into the graph
        gm = trace(model)
    args, kwargs = normalize_inputs(example_inputs)
    propagate_shapes(model, gm, args, kwargs)
    return gm


def _site_entry(st: Any, verified: bool = False) -> dict[str, Any]:
    # verified: a GELU/SiLU site whose replacement matched it to float rounding (exact=True)
    piece = st.piece
    return {
        "kind": "linearize",
        "site": st.name,
        "activation": st.kind,
        "exact": bool(st.exact) or verified,
        "channels": int(piece.numel()),
        "always_off": int((piece == 0).sum()),
        "identity": int((piece == 1).sum()),
        "saturated": int((piece == 2).sum()),
    }


def _linearize_graph(gm: fx.GraphModule, graph: Any, stats: Any, chosen: dict[str, Any], folder: Folder,
                     verified: set[str] = frozenset()) -> None:
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
        aff = ChannelAffine(scale.to(device), shift.to(device), site.channel_dim, site.exact or site.name in verified,
                            site.name)
        with g.inserting_after(node):
            new = g.call_module(folder.add(aff, "egp_lin"), (inp,))
        new.meta["egp_shape"] = node.meta.get("egp_shape", ref)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        folder.removed.append(_site_entry(st, site.name in verified))


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
