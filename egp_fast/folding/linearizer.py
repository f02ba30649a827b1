"""In-place linearisation: :func:`linearize` swaps activation sites of the user's model for
:class:`~egp_fast.folding.ChannelAffine` maps, so fine-tuning between pruning rounds trains the
shallower network.

The maps themselves and the ``how`` choices (``data``, ``identity``, ``majority``) live in
:mod:`egp_fast.folding.affine`. How a site is swapped:

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
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator
from typing import Any

import torch.fx as fx
import torch.nn as nn

from egp_fast.errors import ConfigError
from egp_fast.folding.affine import (
    LINEARIZATIONS,
    ChannelAffine,
    _affine_for,
    _is_exact,
    _module_site_kind_params,
    _target_piece,
    site_affine,
)
from egp_fast.graph import FUNCTION_KINDS, METHOD_KINDS, functional_site_name, module_kind, trace, unwrap_model

__all__ = ["linearize", "linearize_sites", "unremovable_sites"]


# --------------------------------------------------------------------------------------------
# Finding the activation calls and their callers.


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


def _caller_path(node: fx.Node, reused: frozenset[str] | set[str] = frozenset()) -> str | None:
    """Qualified name of the module whose forward makes this call; None if ambiguous: the
    caller, or a module around it, is in ``reused`` (called more than once per forward, as a
    block whose weights are shared across depth: one call cannot be rewritten alone)."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if node.op == "call_module":
        stack = stack[:-1]  # the last entry is the called module itself
    if not stack:
        return ""
    if any(p in reused for p, _ in stack):
        return None
    path = stack[-1][0]
    return None if "@" in path else path


_SHARED_CALLER = ("its caller module is itself called more than once per forward (weights shared across "
                  "depth): one call cannot be replaced alone")


def _reused_modules(gm: fx.GraphModule) -> set[str]:
    """Modules called more than once per forward: fx keys their later calls ``path@k``."""
    return {k.rpartition("@")[0] for n in gm.graph.nodes for k in (n.meta.get("nn_module_stack") or {}) if "@" in k}


@contextlib.contextmanager
def _recording_calls(model: nn.Module) -> Iterator[dict[str, list[tuple[int, tuple[str, ...]]]]]:
    """While tracing ``model``: module path -> ``(positional count, keyword names)`` of each call
    of a module with children (a possible caller of an activation)."""
    calls: dict[str, list[tuple[int, tuple[str, ...]]]] = {}
    handles = []
    try:
        for name, m in model.named_modules():
            if name and next(m.children(), None) is not None:
                def hook(mod, args, kwargs, name=name):
                    calls.setdefault(name, []).append((len(args), tuple(kwargs)))
                handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
        yield calls
    finally:
        for h in handles:
            h.remove()


def _left_out(owner: nn.Module, passed: list[tuple[int, tuple[str, ...]]] | None) -> dict[str, Any] | None:
    """The optional arguments of ``owner.forward`` its one call leaves out, at their defaults
    (traced as placeholders, an ``if shortcut is None`` would be decided the wrong way)."""
    if not passed or len(passed) != 1:
        return None
    n_pos, keywords = passed[0]
    try:
        params = list(inspect.signature(owner.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    left = {p.name: p.default for i, p in enumerate(params)
            if p.kind in kinds and p.default is not p.empty and i >= n_pos and p.name not in keywords}
    return left or None


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


# --------------------------------------------------------------------------------------------
# Swapping sites in place.


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
    model = unwrap_model(model)
    chosen = _selected(stats, sites, how)
    if not chosen:
        return [], []
    refused: list[tuple[str, str]] = []
    try:
        with _recording_calls(model) as calls:
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
    reused = _reused_modules(gm)
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
        caller = _caller_path(node, reused)
        if caller is None:
            refused.append((name, _SHARED_CALLER))
            continue
        by_caller.setdefault(caller, []).append((node, name, mod))
    for caller, items in by_caller.items():
        ok, why = _rewrite_caller(model, gm, caller, items, chosen, how, calls.get(caller))
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
    reused = _reused_modules(gm)
    out = {}
    for node, name, mod in acts:
        if name not in wanted or (mod is not None and module_calls[mod] == 1):
            continue
        caller = _caller_path(node, reused)
        if caller is None:
            out[name] = _SHARED_CALLER
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
    passed: list[tuple[int, tuple[str, ...]]] | None = None,
) -> tuple[bool, str]:
    """Re-trace ``caller`` alone and point the chosen activation calls at ChannelAffines.

    ``passed``: what the caller's call received in the full trace (see :func:`_recording_calls`);
    the optional arguments it left out are fixed at their defaults in the re-trace."""
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
            sub = trace(owner, concrete_args=_left_out(owner, passed))
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
