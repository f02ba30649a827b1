"""Linearisation: zero-entropy activation sites become per-channel affine maps.

A site whose every channel stays in one linear piece of its activation on the data (docs/algorithm.md,
"Collapse") computes ``y = scale[c] * z + shift[c]`` there: identity for always-ON ReLU
channels, zero for always-OFF ones, the slope for LeakyReLU/PReLU, the clip value or the
identity for ReLU6/Hardtanh. :class:`ChannelAffine` is that map as a module.

:func:`linearize` swaps those sites in place, on the user's model, so fine-tuning between
pruning rounds trains the shallower network. How a site is swapped:

* an activation *module* called once: the module is replaced by a :class:`ChannelAffine`
  (``setattr`` on its parent; nothing else changes);
* a module called several times (torchvision's BasicBlock calls ``self.relu`` twice) or a
  functional call (``F.relu``, ``x.relu()``): the submodule whose ``forward`` makes the call
  (the *caller*, read from fx's ``nn_module_stack``) is replaced by an ``fx.GraphModule`` of
  itself in which only that call node targets a new :class:`ChannelAffine`. Parameters and
  submodules are the same objects, so optimizers and masks keep working; the caller loses its
  Python class (it becomes a ``GraphModule``). We chose this over a call-counting wrapper
  module: a counter must be reset every forward, breaks under exceptions, re-entrancy and
  ``torch.compile``, whereas the rewritten graph is a plain, picklable module.
  The remaining calls of a partly linearised module are pointed at an alias attribute
  ``<attr>_call<k>`` (the same module object), so their site names become
  ``<caller>.<attr>_call<k>``: a stale statistic for ``<attr>:k`` can never hit the wrong call.
* a functional call in the root module's own ``forward`` can only be rewritten in place when
  the root is itself an ``fx.GraphModule`` (``egp_fast.trace(model)``); otherwise the site is
  left alone with a warning (``collapse`` handles it, since it returns a new module).

What a site becomes (``how``):

* ``"data"``: the piece each channel never left on the data. Only zero-entropy sites qualify;
  the map equals the activation on every measured sample.
* ``"identity"`` (EASIER's choice): ``y = z`` on every channel, whatever the data says.
* ``"majority"``: per channel, the piece it sat in most often: identity where ``p_on >= 0.5``,
  zero (or the negative slope) otherwise; for ReLU6/Hardtanh the most frequent of the three
  pieces (ties: the lower piece), from ``SiteStats.piece_counts``.

``identity`` and ``majority`` replace a site even when it still changes state on the data: the
network's function changes, which is the point of EASIER (fine-tuning recovers the accuracy).
Such a :class:`ChannelAffine` has ``exact=False``, so :func:`egp_fast.collapse` reports it as an
approximation; a map that agrees with the data on every channel keeps ``exact=True`` (unless
the activation is smooth: GELU/SiLU are never exactly affine).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from egp_fast.errors import ConfigError, ModelError
from egp_fast.graph import FUNCTION_KINDS, METHOD_KINDS, module_kind, functional_site_name, unwrap_model

__all__ = ["LINEARIZATIONS", "ChannelAffine", "linearize", "site_affine"]

#: Ways :func:`linearize` can replace a site (see the module docstring).
LINEARIZATIONS = ("data", "identity", "majority")


def _channel_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[dim] = -1
    return x * scale.view(shape).to(x.dtype) + shift.view(shape).to(x.dtype)


# Traced as one call (fx cannot build ``[1] * x.dim()`` from a Proxy); the collapse pass
# recognises the node and turns it back into a ChannelAffine.
fx.wrap("_channel_affine")


class ChannelAffine(nn.Module):
    """``y = x * scale[c] + shift[c]`` along one channel axis: a linearised activation site.

    Args:
        scale: float tensor ``[C]``.
        shift: float tensor ``[C]``.
        channel_dim: the channel axis of the input (1 for ``[N, C, ...]``, -1 for tokens).
        exact: False when it only approximates the site it replaced: a smooth activation
            (GELU, SiLU), or a site that still changed state on the data and was replaced by
            the identity or its majority piece (EASIER).
        site: the name of the site it replaced (for reports).
        how: how the map was chosen: ``"data"``, ``"identity"`` or ``"majority"`` (see
            :func:`linearize`).

    Example:
        >>> m = ChannelAffine(torch.tensor([1.0, 0.0]), torch.zeros(2), channel_dim=1)
        >>> m(torch.ones(1, 2, 3, 3))[0, :, 0, 0]
        tensor([1., 0.])
    """

    def __init__(
        self,
        scale: torch.Tensor,
        shift: torch.Tensor,
        channel_dim: int = 1,
        exact: bool = True,
        site: str = "",
        how: str = "data",
    ) -> None:
        super().__init__()
        if scale.shape != shift.shape or scale.dim() != 1:
            raise ConfigError(
                f"ChannelAffine needs scale and shift of the same shape [C]; got "
                f"{list(scale.shape)} and {list(shift.shape)}"
            )
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())
        self.channel_dim = int(channel_dim)
        self.exact = bool(exact)
        self.site = site
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _channel_affine(x, self.scale, self.shift, self.channel_dim)

    def is_identity(self) -> bool:
        return bool((self.scale == 1).all()) and bool((self.shift == 0).all())

    def extra_repr(self) -> str:
        on = int((self.scale == 1).sum())
        zero = int(((self.scale == 0) & (self.shift == 0)).sum())
        return (
            f"channels={self.scale.numel()}, channel_dim={self.channel_dim}, identity={on}, "
            f"zero={zero}, exact={self.exact}, site={self.site!r}, how={getattr(self, 'how', 'data')!r}"
        )


def site_affine(
    kind: str,
    piece: torch.Tensor,
    params: dict[str, Any] | None = None,
    prelu_weight: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)`` of an activation whose channels sit in fixed pieces.

    Args:
        kind: the site's activation (``relu``, ``relu6``, ``hardtanh``, ``leaky_relu``,
            ``prelu``, ``gelu``, ``silu``).
        piece: int64 ``[C]``: the piece each channel stays in (``SiteStats.piece``); every
            entry must be >= 0.
        params: activation parameters (``Site.params``: ``negative_slope``, ``min_val``,
            ``max_val``).
        prelu_weight: the PReLU slopes (one, or one per channel) for ``kind="prelu"``.
        dtype: dtype of the result.

    Returns:
        ``(scale, shift)``, each ``[C]``.

    Raises:
        ConfigError: a channel is not constant, or the kind is unknown.

    Example:
        >>> site_affine("relu", torch.tensor([0, 1]))
        (tensor([0., 1.]), tensor([0., 0.]))
    """
    params = params or {}
    piece = piece.to(torch.int64).cpu()
    if bool((piece < 0).any()):
        raise ConfigError(
            f"site_affine: {int((piece < 0).sum())} channel(s) change piece on the data; only "
            "zero-entropy sites (every channel constant) can be linearised"
        )
    c = piece.numel()
    scale = torch.zeros(c, dtype=torch.float64)
    shift = torch.zeros(c, dtype=torch.float64)
    on = piece == 1
    if kind in ("relu", "gelu", "silu", "leaky_relu", "prelu"):
        if bool((piece > 1).any()):
            raise ConfigError(f"site_affine: a {kind} site has two pieces, got piece {int(piece.max())}")
        scale[on] = 1.0
        if kind == "leaky_relu":
            scale[~on] = float(params.get("negative_slope", 0.01))
        elif kind == "prelu":
            if prelu_weight is None:
                raise ConfigError("site_affine: kind='prelu' needs prelu_weight (the PReLU slopes)")
            w = prelu_weight.detach().to(torch.float64).cpu().reshape(-1)
            w = w.expand(c) if w.numel() == 1 else w
            if w.numel() != c:
                raise ConfigError(f"site_affine: PReLU has {w.numel()} slopes for {c} channels")
            scale[~on] = w[~on]
    elif kind in ("relu6", "hardtanh"):
        lo = float(params.get("min_val", 0.0 if kind == "relu6" else -1.0))
        hi = float(params.get("max_val", 6.0 if kind == "relu6" else 1.0))
        if bool((piece > 2).any()):
            raise ConfigError(f"site_affine: a {kind} site has three pieces, got piece {int(piece.max())}")
        scale[on] = 1.0
        shift[piece == 0] = lo
        shift[piece == 2] = hi
    else:
        raise ConfigError(f"site_affine: unknown activation kind {kind!r}")
    return scale.to(dtype), shift.to(dtype)


# --------------------------------------------------------------------------------------------
# In-place linearisation.


def _activation_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, str, str | None]]:
    """``(node, site name, module name)`` for every activation call, in graph order.

    Names follow :func:`egp_fast.graph.discover_sites` (module name, ``:k`` for extra calls,
    node or owner name for functional calls).
    """
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    owners: dict[str, int] = {}
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = modules.get(node.target)
            if m is None or module_kind(m) is None:
                continue
            k = calls.get(node.target, 0)
            calls[node.target] = k + 1
            out.append((node, node.target if k == 0 else f"{node.target}:{k}", node.target))
        elif (node.op == "call_function" and node.target in FUNCTION_KINDS) or (
            node.op == "call_method" and node.target in METHOD_KINDS
        ):
            out.append((node, functional_site_name(node, owners), None))
    return out


def _caller_path(node: fx.Node) -> str | None:
    """Qualified name of the module whose forward makes this call; None if ambiguous."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if node.op == "call_module":
        stack = stack[:-1]  # the last entry is the called module itself
    if not stack:
        return ""
    path = stack[-1][0]
    return None if "@" in path else path


def _module_site_kind_params(m: nn.Module) -> dict[str, Any]:
    from egp_fast.graph import module_params

    kind = module_kind(m)
    return module_params(kind, m) if kind else {}


def _target_piece(st: Any, how: str) -> torch.Tensor:
    """The piece each channel of a site is mapped to: int64 ``[C]`` on the CPU.

    ``data``: the piece it never left (the site must be at zero entropy); ``identity``: the
    linear piece ``y = z`` (piece 1 for every supported kind); ``majority``: the piece it sat
    in most often (two pieces: ON when ``p_on >= 0.5``; more: ``piece_counts.argmax``, which
    returns the lower piece on a tie).
    """
    channels = int(st.piece.numel())
    if how == "data":
        return st.piece.to(torch.int64).cpu()
    if how == "identity":
        return torch.ones(channels, dtype=torch.int64)
    if len(st.breakpoints) <= 1:
        return (st.p_on.cpu() >= 0.5).to(torch.int64)
    return st.piece_counts.cpu().argmax(0).to(torch.int64)


def _is_exact(st: Any, piece: torch.Tensor) -> bool:
    """True when the affine map equals the activation on every measured observation."""
    return bool(st.exact) and bool(st.collapsible) and torch.equal(piece, st.piece.to(torch.int64).cpu())


def _affine_for(node: fx.Node, owner: nn.Module, st: Any, how: str = "data") -> ChannelAffine:
    """The ChannelAffine replacing one activation call, from its statistics."""
    from egp_fast.graph import function_params

    prelu_w = None
    if node.op == "call_module":
        m = owner.get_submodule(node.target)
        params = _module_site_kind_params(m)
        if st.kind == "prelu":
            prelu_w = m.weight
    else:
        params = function_params(st.kind, node) if node.op == "call_function" else {}
        if st.kind == "prelu":
            w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if not (isinstance(w, fx.Node) and w.op == "get_attr"):
                raise ModelError(f"site {st.name}: the PReLU slopes are not a module attribute")
            prelu_w = owner.get_parameter(w.target)
    dtype = torch.float32
    for p in owner.parameters():
        if p.is_floating_point():
            dtype = p.dtype
            break
    piece = _target_piece(st, how)
    scale, shift = site_affine(st.kind, piece, params, prelu_w, dtype=dtype)
    device = next((b.device for b in owner.buffers()), None) or next(
        (p.device for p in owner.parameters()), torch.device("cpu")
    )
    return ChannelAffine(scale.to(device), shift.to(device), st.channel_dim, _is_exact(st, piece), st.name, how)


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, new)


def _fresh_attr(m: nn.Module, base: str) -> str:
    name, i = base, 0
    while hasattr(m, name):
        i += 1
        name = f"{base}_{i}"
    return name


def linearize(
    model: nn.Module, stats: Any, sites: list[str] | None = None, how: str = "data"
) -> list[str]:
    """Replace activation sites of ``model`` by per-channel affine maps, in place.

    With ``how="data"`` (the default) every zero-entropy site becomes the affine map it
    already is on the data; between pruning rounds this lets fine-tuning train the shallower
    model (the prune-collapse loop), and sites with a channel that changes piece are never
    touched. With ``how="identity"`` or ``"majority"`` (EASIER's activation removal) the named
    ``sites`` are replaced even when their entropy is above zero: this changes the network's
    function (the new :class:`ChannelAffine` has ``exact=False``) and is meant to be followed by
    fine-tuning. See the module docstring for the maps and for how modules called twice and
    functional calls are handled.

    Args:
        model: the network (edited in place; a DDP/DataParallel wrapper is unwrapped).
        stats: :class:`egp_fast.measurement.EntropyStats` measured on this model.
        sites: only these site names (default: every collapsible site in ``stats``; required
            for ``how="identity"`` and ``"majority"``).
        how: ``"data"``, ``"identity"`` or ``"majority"``.

    Returns:
        Names of the sites replaced, in execution order. Sites that could not be replaced
        are reported with ``warnings.warn`` (reason included) and left as they are.

    Raises:
        ConfigError: ``sites`` names a site that ``stats`` does not have, ``how`` is not one
            of :data:`LINEARIZATIONS`, or ``how`` is ``identity``/``majority`` without ``sites``.

    Example:
        >>> import torch, egp_fast
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> net[0].bias.data += 100.0  # every unit always ON
        >>> stats = egp_fast.measure_entropy(net, [torch.randn(32, 4)], progress=False)
        >>> egp_fast.linearize(net, stats)
        ['1']
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> stats = egp_fast.measure_entropy(net, [torch.randn(32, 4)], progress=False)
        >>> egp_fast.linearize(net, stats, sites=["1"], how="identity")
        ['1']
        >>> net[1].exact, net[1].is_identity()
        (False, True)
    """
    done, refused = linearize_sites(model, stats, sites, how)
    for name, why in refused:
        warnings.warn(f"egp_fast.linearize: site {name} left in place: {why}", stacklevel=2)
    return done


def _check_how(how: Any, sites: list[str] | None) -> None:
    if isinstance(how, dict):  # private form: one way per site (EASIER mixes data and identity)
        for h in how.values():
            _check_how(h, sites)
        return
    if how not in LINEARIZATIONS:
        raise ConfigError(f"how={how!r} is not a linearisation; use one of {LINEARIZATIONS}")
    if how != "data" and sites is None:
        raise ConfigError(
            f"how={how!r} replaces sites that still change state, so name them: pass "
            "sites=[...] (how='data' alone picks every zero-entropy site by itself)"
        )


def _selected(stats: Any, sites: list[str] | None, how: str = "data") -> dict[str, Any]:
    """The statistics of the sites to replace: named ones (all of them unless ``how="data"``,
    which keeps only zero-entropy sites), or every zero-entropy site."""
    _check_how(how, sites)
    if sites is not None and (isinstance(sites, str) or not all(isinstance(n, str) for n in sites)):
        raise ConfigError(f"sites must be a list of site names (str), got {sites!r}")
    all_sites = getattr(stats, "sites", None)
    if not isinstance(all_sites, dict):
        raise ConfigError(
            f"stats must be the EntropyStats returned by egp_fast.measure_entropy, got {type(stats).__name__}"
        )
    if sites is None:
        return {n: s for n, s in all_sites.items() if s.collapsible}
    unknown = [n for n in sites if n not in all_sites]
    if unknown:
        raise ConfigError(f"sites names {unknown} that stats does not have; stats has: {', '.join(all_sites)}")
    return {n: all_sites[n] for n in sites if _how(how, n) != "data" or all_sites[n].collapsible}


def _how(how: str | dict[str, str], site: str) -> str:
    return how.get(site, "data") if isinstance(how, dict) else how


def linearize_sites(
    model: nn.Module, stats: Any, sites: list[str] | None, how: str | dict[str, str] = "data"
) -> tuple[list[str], list[tuple[str, str]]]:
    """Linearise in place; ``how`` is one way for all sites or ``{site: way}``.

    Returns ``(done, refused)``: the sites replaced (execution order) and ``(site, reason)``
    for those left in place. One trace for all sites: replacing one call of a module called
    twice renames the other call, so the sites of one round must be replaced together.
    """
    from egp_fast.graph import trace

    model = unwrap_model(model)
    chosen = _selected(stats, sites, how)
    if not chosen:
        return [], []
    refused: list[tuple[str, str]] = []
    try:
        gm = trace(model)
    except Exception as e:  # untraceable: only single-call activation modules can be swapped
        return _linearize_modules_only(model, chosen, f"{type(e).__name__}: {str(e)[:120]}", how)
    acts = _activation_nodes(gm)
    found = {name for _, name, _ in acts}
    for name in chosen:
        if name not in found:
            refused.append((name, "no such activation call in the model (stale statistics?)"))
    module_calls: dict[str, int] = {}
    for _, _, mod in acts:
        if mod is not None:
            module_calls[mod] = module_calls.get(mod, 0) + 1
    done: list[str] = []
    # caller path -> list of (index of the call among the caller's activation calls, site name)
    by_caller: dict[str, list[tuple[fx.Node, str, str | None]]] = {}
    for node, name, mod in acts:
        if name not in chosen:
            continue
        st = chosen[name]
        if st.channels and st.piece.numel() != st.channels:
            refused.append((name, "statistics have the wrong number of channels"))
            continue
        if mod is not None and module_calls[mod] == 1:
            aff = _affine_for(node, model, st, _how(how, name))
            _set_submodule(model, mod, aff)
            done.append(name)
            continue
        caller = _caller_path(node)
        if caller is None:
            refused.append((name, "its caller module is itself called more than once per forward"))
            continue
        by_caller.setdefault(caller, []).append((node, name, mod))
    for caller, items in by_caller.items():
        ok, why = _rewrite_caller(model, gm, caller, items, chosen, how)
        if ok:
            done.extend(n for _, n, _ in items)
        else:
            refused.extend((n, why) for _, n, _ in items)
    order = {name: i for i, (_, name, _) in enumerate(acts)}
    done.sort(key=lambda n: order.get(n, 0))
    return done, refused


def unremovable_sites(model: nn.Module, names: list[str]) -> dict[str, str]:
    """The sites among ``names`` that :func:`linearize` cannot replace in place, with the reason.

    The same checks :func:`linearize_sites` makes, without changing anything: a functional call (or
    one call of a module called twice) in the root's own forward needs a root ``GraphModule``;
    a model fx cannot trace allows only activation modules called once.
    """
    from egp_fast.graph import trace

    model = unwrap_model(model)
    if not names:
        return {}
    try:
        gm = trace(model)
    except Exception as e:
        why = f"torch.fx cannot trace the model ({type(e).__name__}); only activation modules called once can be swapped"
        out = {}
        for name in names:
            base = name.split(":")[0]
            try:
                m = model.get_submodule(base)
            except AttributeError:
                m = None
            if m is None or module_kind(m) is None or ":" in name or any(n.startswith(base + ":") for n in names):
                out[name] = why
        return out
    acts = _activation_nodes(gm)
    module_calls: dict[str, int] = {}
    for _, _, mod in acts:
        if mod is not None:
            module_calls[mod] = module_calls.get(mod, 0) + 1
    wanted = set(names)
    out = {}
    for node, name, mod in acts:
        if name not in wanted or (mod is not None and module_calls[mod] == 1):
            continue
        caller = _caller_path(node)
        if caller is None:
            out[name] = "its caller module is itself called more than once per forward"
        elif not caller and not isinstance(model, fx.GraphModule):
            out[name] = (
                "a functional activation (or a module called twice) in the root module's own forward "
                "cannot be rewritten in place; pass egp_fast.trace(model) (a GraphModule) instead"
            )
    return out


def _linearize_modules_only(
    model: nn.Module, chosen: dict[str, Any], why: str, how: str | dict[str, str] = "data"
) -> tuple[list[str], list[tuple[str, str]]]:
    done, refused = [], []
    names = set(chosen)
    for name, st in chosen.items():
        base = name.split(":")[0]
        multi = any(n.startswith(base + ":") for n in names) or ":" in name
        try:
            m = model.get_submodule(base)
        except AttributeError:
            m = None
        if m is None or module_kind(m) is None or multi:
            refused.append((name, f"torch.fx cannot trace the model ({why}); only activation modules "
                                  "called once can be swapped"))
            continue
        prelu_w = m.weight if st.kind == "prelu" else None
        piece = _target_piece(st, _how(how, name))
        scale, shift = site_affine(st.kind, piece, _module_site_kind_params(m), prelu_w)
        ref = next(iter(model.parameters()), None)
        if ref is not None:
            scale, shift = scale.to(ref.device, ref.dtype), shift.to(ref.device, ref.dtype)
        aff = ChannelAffine(scale, shift, st.channel_dim, _is_exact(st, piece), name, _how(how, name))
        _set_submodule(model, base, aff)
        done.append(name)
    return done, refused


def _rewrite_caller(
    model: nn.Module,
    full: fx.GraphModule,
    caller: str,
    items: list[tuple[fx.Node, str, str | None]],
    chosen: dict[str, Any],
    how: str | dict[str, str] = "data",
) -> tuple[bool, str]:
    """Re-trace ``caller`` alone and point the chosen activation calls at ChannelAffines."""
    from egp_fast.graph import trace

    try:
        owner = model.get_submodule(caller) if caller else model
    except AttributeError:  # a module called in forward but not attached (transformers' module-level gelu)
        return False, f"its caller {caller} is not a submodule of the model"
    if not caller and not isinstance(owner, fx.GraphModule):
        return False, (
            "a functional activation (or a module called twice) in the root module's own forward "
            "cannot be rewritten in place; pass egp_fast.trace(model) (a GraphModule) instead, or "
            "use egp_fast.collapse, which returns a new model"
        )
    # The caller's activation calls in the full trace, in order, map 1:1 to those of its own trace.
    mine = [n for n, _, _ in _activation_nodes(full) if _caller_path(n) == caller]
    if isinstance(owner, fx.GraphModule) and not caller:
        sub = owner
    else:
        try:
            sub = trace(owner)
        except Exception as e:
            return False, f"torch.fx cannot trace its caller {caller or 'the root'} ({type(e).__name__})"
    local = [n for n, _, _ in _activation_nodes(sub) if _caller_path(n) == ""]
    if len(local) != len(mine):
        return False, f"the calls in {caller or 'the root'} do not line up with the full trace"
    index = {n: i for i, n in enumerate(mine)}
    # Call number of each local module call, taken before any node is replaced.
    callk: dict[fx.Node, int] = {}
    seen: dict[str, int] = {}
    for ln in local:
        if ln.op == "call_module":
            callk[ln] = seen.get(ln.target, 0)
            seen[ln.target] = callk[ln] + 1
    prefix = caller + "." if caller else ""
    edited_modules: set[str] = set()
    for node, name, mod in items:
        i = index[node]
        ln = local[i]
        aff = _affine_for(node, model, chosen[name], _how(how, name))
        base = (mod[len(prefix):] if mod else name).replace(".", "_").replace(":", "_")
        attr = _fresh_attr(sub, f"{base}_lin")
        sub.add_submodule(attr, aff)
        with sub.graph.inserting_after(ln):
            new = sub.graph.call_module(attr, (ln.args[0] if ln.args else ln.kwargs["input"],))
        ln.replace_all_uses_with(new)
        sub.graph.erase_node(ln)
        if mod is not None:
            edited_modules.add(mod[len(prefix):])
    # Remaining calls of a partly linearised module get an alias attribute (see module docstring).
    for ln in list(sub.graph.nodes):
        if ln.op == "call_module" and ln.target in edited_modules:
            k = callk.get(ln, 0)
            alias = _fresh_attr(sub, f"{ln.target.replace('.', '_')}_call{k}")
            sub.add_submodule(alias, sub.get_submodule(ln.target))
            ln.target = alias
    sub.graph.lint()
    sub.recompile()
    # Drop the original attribute name of aliased modules, so the remaining calls are named
    # (and found by fx's path lookup) by their alias only.
    used = {n.target for n in sub.graph.nodes if n.op == "call_module"}
    for name in edited_modules - used:
        sub.delete_submodule(name)
    if sub is not owner:
        sub.train(owner.training)
        _set_submodule(model, caller, sub)
    return True, ""
