"""Site discovery: every nonlinearity call in the forward pass, its producers and channel axis.

The model is traced with ``torch.fx`` (:func:`egp_fast.graph.trace`), shapes are recorded on the
example inputs, and each activation node becomes a :class:`~egp_fast.graph.Site` with the
producers the walk of :mod:`egp_fast.graph.walk` finds. When tracing fails, module hooks see
module activations only (with a warning), and producers come from execution order.
"""

from __future__ import annotations

import io
import sys
import warnings
from typing import Any

import torch.fx as fx
import torch.nn as nn

from egp_fast.errors import DataError, ModelError
from egp_fast.graph.inputs import _input_names, describe_inputs, eval_mode, normalize_inputs, placeholder_args
from egp_fast.graph.sites import (
    FUNCTION_KINDS,
    METHOD_KINDS,
    SUPPORTED_ACTIVATIONS,
    WEIGHT_TYPES,
    Site,
    SiteGraph,
    _breakpoints,
    function_params,
    module_kind,
    module_params,
)
from egp_fast.graph.shapes import propagate_shapes
from egp_fast.graph.tracing import _module_kinds, _trace
from egp_fast.graph.walk import _channel_dim, _Walker

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
    kinds = _module_kinds(model)
    # Traced and run in eval mode: a forward that reads ``self.training`` (a batch-norm wrapper
    # fx traces through, dropout) must not freeze training behaviour into the graph, and the
    # shape pass must not update running statistics.
    with eval_mode(model):
        try:
            gm = _trace(model, _input_names(model, args, kwargs), example_inputs, kinds, defer=True)
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
    walker = _Walker(gm, modules)
    sites: list[Site] = []
    module_calls: dict[str, int] = {}
    owner_counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        kind = None
        params: dict[str, Any] = {}
        module_name = None
        if node.op == "call_module":
            m = modules.get(node.target)
            # a module of the model: its kind decided before tracing; one the trace added
            # (a transformers call bound to its config): probed now
            kind = kinds[m] if m in kinds else (module_kind(m) if m is not None else None)
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
        # egp_fast.folding.ChannelAffine (by name: the graph layer does not import folding)
        linearised = sum(type(m).__name__ == "ChannelAffine" for m in model.modules())
        if linearised:
            raise ModelError(
                f"every activation of {type(model).__name__} has been linearised ({linearised} "
                "ChannelAffine maps): there is nothing left to measure. To fold them, pass "
                "collapse() the statistics measured before linearising, or empty ones: "
                "egp_fast.collapse(model, egp_fast.EntropyStats({}, 'exact', 0), example_inputs)"
            )
        raise ModelError(
            f"{type(model).__name__} has no supported activation ({', '.join(SUPPORTED_ACTIVATIONS)}); "
            "EGP measures the entropy of rectifier-like activations, so there is nothing to prune by"
        )
    _, arg_names = placeholder_args(model, gm, args, kwargs)
    return SiteGraph(sites, gm, arg_names)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain network inside DDP, DataParallel and ``torch.compile`` wrappers.

    Every entry point (discovery, measurement, pruning, collapse) works on the unwrapped model,
    so site and layer names never carry a wrapper's prefix (``module.``, ``_orig_mod.``). The
    wrappers share the network's parameters and buffers, so what is done to it shows through them.

    Args:
        model: a module, possibly wrapped (any nesting of the wrappers).

    Returns:
        The innermost module.

    Example:
        >>> import torch, egp_fast
        >>> m = torch.nn.Linear(2, 2)
        >>> egp_fast.graph.unwrap_model(torch.nn.DataParallel(m)) is m
        True
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module  # the real network is in .module
        elif isinstance(model._modules.get("_orig_mod"), nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
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
