"""``trace()``: torch.fx tracing of a model, with a fallback for models fx cannot follow whole.

Plain fx tracing comes first. When it fails on a ``transformers`` model (or one whose root
takes ``**kwargs``), a second tracer keeps every module that holds no activation as a leaf,
records the ``transformers`` mask builders as single calls, binds the library objects (configs)
the model holds, and rebuilds ``ModelOutput`` results. The shape pass is in
:mod:`egp_fast.graph.shapes`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect as _inspect
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from egp_fast.graph.inputs import _named_inputs
from egp_fast.graph.sites import module_kind
from egp_fast.graph.tracer import _DeferredGraphModule, _graph_module, _Tracer

def trace(model: nn.Module, input_names: list[str] | None = None, example_inputs: Any = None,
          concrete_args: dict[str, Any] | None = None) -> fx.GraphModule:
    """Symbolically trace ``model`` with torch.fx, activation and weight modules kept as leaves.

    The result shares the model's submodules and parameters (no copy). Use it as the model
    when a functional activation in the root ``forward`` must be linearised in place.

    When plain tracing fails, a second tracer is tried that (1) traces the root ``forward``
    through a wrapper taking just ``input_names`` as keyword inputs (the others keep their
    defaults; ``use_cache`` is set to False), (2) keeps every submodule that contains no
    activation as a leaf (attention, embeddings, norms) and (3) records the ``transformers``
    mask builders as single calls. This is what traces Hugging Face ``transformers`` models
    (BERT, ViT, GPT-2, LLaMA...); ``ModelOutput`` results are rebuilt, so
    ``traced(**inputs).logits`` works. The traced module then takes exactly those inputs.

    Args:
        model: the network; its forward must be traceable (no data-dependent control flow
            outside the leaves).
        input_names: the keyword inputs the traced module takes, for the second tracer
            (default: the model's ``main_input_name``, e.g. ``input_ids``, or its first
            positional argument). :func:`discover_sites` passes the keys of the example inputs.
        example_inputs: optional batch (tensor, tuple or dict); the second tracer reads the
            dtype, device and number of dims of each input from it (and nothing else: batch
            size and sequence length stay free). Its keys give ``input_names`` when that is None.
        concrete_args: arguments of ``model.forward`` fixed at these values for the plain
            tracer (``torch.fx``'s own option): an optional input its caller never passes,
            whose ``is None`` test would otherwise be decided on a placeholder.

    Returns:
        An ``fx.GraphModule`` computing the same function.

    Raises:
        Whatever torch.fx raised on the first attempt, when the second one fails too (for a
        ``transformers`` model, what the second attempt met: the first fails on the
        ``**kwargs`` signature, which says nothing about the model).

    Example:
        >>> import torch, egp_fast
        >>> gm = egp_fast.trace(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
        >>> isinstance(gm, torch.fx.GraphModule)
        True
    """
    return _trace(model, input_names, example_inputs, _module_kinds(model), concrete_args=concrete_args)


def _module_kinds(model: nn.Module) -> dict[nn.Module, str | None]:
    """Every module of ``model`` -> its site kind (``None``: not an activation), decided before
    tracing (probing inside the tracer would run under fx's patches) and once per module
    (discovery reads the same dict for its sites)."""
    return {m: module_kind(m) for m in model.modules()}


def _trace(model: nn.Module, input_names: list[str] | None, example_inputs: Any,
           kinds: dict[nn.Module, str | None], defer: bool = False,
           concrete_args: dict[str, Any] | None = None) -> fx.GraphModule | _DeferredGraphModule:
    """:func:`trace` with the module kinds of :func:`_module_kinds` given; with ``defer``, a
    plain trace comes back as a :class:`_DeferredGraphModule` (site discovery's case)."""
    name = model.__class__.__name__
    try:
        tracer = _Tracer(kinds=kinds)
        graph = tracer.trace(model, concrete_args=concrete_args)
        if defer:
            return _DeferredGraphModule(tracer.root, graph, name)
        return _graph_module(tracer.root, graph, name)
    except Exception as first:
        hf = any(_is_transformers_model(m) for m in model.modules())
        if not (hf or input_names is not None or _root_takes_varargs(model)):
            raise
        try:
            return _trace_opaque(model, input_names, kinds, hf, _named_inputs(model, example_inputs))
        except Exception as second:
            # A transformers model's real obstacle is what the tracer made for it met (the plain
            # one fails on the **kwargs signature first, which says nothing to the user).
            raise (second if hf else first) from None


def _rebuild_output(module: str, qualname: str, value: Any) -> Any:
    """Turn the plain dict fx records for a ``transformers`` ``ModelOutput`` back into one.

    The class travels by name (strings survive fx's code generation and ``torch.load``).
    """
    cls: Any = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    return cls(**value)


fx.wrap("_rebuild_output")


def _root_takes_varargs(model: nn.Module) -> bool:
    try:
        sig = _inspect.signature(type(model).forward)
    except (TypeError, ValueError):
        return False
    return any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in sig.parameters.values())


def _is_transformers_model(model: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def _default_input_names(model: nn.Module) -> list[str]:
    main = getattr(model, "main_input_name", None)
    if isinstance(main, str):
        return [main]
    try:
        sig = _inspect.signature(model.forward)
    except (TypeError, ValueError):
        return []
    return [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:1]


def _hf_autowrap() -> tuple:
    # transformers' attention-mask builders branch on their inputs (fx cannot follow them);
    # each becomes one call node. Only looked up when transformers is already imported.
    mu = sys.modules.get("transformers.masking_utils")
    if mu is None:
        return ()
    names = ("create_causal_mask", "create_bidirectional_mask", "create_sliding_window_causal_mask",
             "create_chunked_causal_mask", "create_masks_for_generate")
    return tuple(getattr(mu, n) for n in names if callable(getattr(mu, n, None)))


def _failing_module(tb: Any) -> nn.Module | None:
    """The innermost module whose call was being traced when fx failed (from the traceback)."""
    found = None
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "module_call_wrapper":
            m = tb.tb_frame.f_locals.get("mod")
            if isinstance(m, nn.Module):
                found = m
        tb = tb.tb_next
    return found


@contextlib.contextmanager
def _wrap_calls(tracer: fx.Tracer, modules: set[nn.Module], functions: tuple) -> Iterator[None]:
    """Inside the traced modules' source modules, make ``functions`` record one call node.

    fx's own automatic wrapping looks at the globals of ``forward``, which for a decorated
    ``transformers`` forward are the decorator's module, not the model's: patch the globals of
    the undecorated functions instead (restored on exit).
    """
    if not functions:
        yield
        return
    targets = {id(f): f for f in functions}

    def wrapped(orig: Any) -> Any:
        @functools.wraps(orig)
        def call(*args: Any, **kwargs: Any) -> Any:
            leaves = list(args) + list(kwargs.values())
            if any(isinstance(v, fx.Proxy) for v in leaves):
                proxy = tracer.create_proxy("call_function", orig, args, kwargs)
                proxy.node.meta["is_wrapped"] = True  # codegen re-wraps it (torch.load re-traces)
                return proxy
            return orig(*args, **kwargs)

        return call

    patched: list[tuple[dict, str, Any]] = []
    seen: set[int] = set()
    try:
        for m in modules:
            fn = _inspect.unwrap(getattr(type(m), "forward", None) or (lambda: None))
            g = getattr(fn, "__globals__", None)
            if g is None or id(g) in seen:
                continue
            seen.add(id(g))
            for k, v in list(g.items()):
                if id(v) in targets:
                    patched.append((g, k, v))
                    g[k] = wrapped(v)
        yield
    finally:
        for g, k, v in reversed(patched):
            g[k] = v


class _BoundCall(nn.Module):
    """``fn(*args, **kwargs)`` with some arguments fixed to objects the model holds (its config).

    A call node cannot hold such an object as a constant (fx would rebuild a config from its
    public fields, and lose the attention implementation), and a ``get_attr`` of it does not
    survive ``torch.load``, which re-traces the code; a module holding it does.
    """

    _egp_not_activation = True  # never probed as an activation

    def __init__(self, fn: Any, fixed_args: dict[int, Any], fixed_kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.fn = fn
        self.fixed_args = fixed_args
        self.fixed_kwargs = fixed_kwargs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        full = list(args)
        for i in sorted(self.fixed_args):
            full.insert(i, self.fixed_args[i])
        return self.fn(*full, **kwargs, **self.fixed_kwargs)

    def extra_repr(self) -> str:
        return f"fn={getattr(self.fn, '__qualname__', self.fn)!r}"


def _bind_library_objects(gm: fx.GraphModule, paths: set[str]) -> None:
    """Turn calls that take a library object (``get_attr`` of a config) into :class:`_BoundCall`s."""
    if not paths:
        return
    g = gm.graph
    changed = False
    for node in list(g.nodes):
        if node.op != "call_function":
            continue

        def held(a: Any) -> bool:
            return isinstance(a, fx.Node) and a.op == "get_attr" and a.target in paths

        if not any(held(a) for a in list(node.args) + list(node.kwargs.values())):
            continue
        fixed_args = {i: _attr(gm, a.target) for i, a in enumerate(node.args) if held(a)}
        fixed_kwargs = {k: _attr(gm, a.target) for k, a in node.kwargs.items() if held(a)}
        name = f"_egp_call{sum(1 for n, _ in gm.named_children() if n.startswith('_egp_call'))}"
        gm.add_submodule(name, _BoundCall(node.target, fixed_args, fixed_kwargs))
        with g.inserting_before(node):
            new = g.call_module(
                name,
                tuple(a for a in node.args if not held(a)),
                {k: a for k, a in node.kwargs.items() if not held(a)},
            )
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        changed = True
    if changed:
        for node in list(g.nodes):
            if node.op == "get_attr" and node.target in paths and not node.users:
                g.erase_node(node)
        g.lint()
        gm.recompile()


def _attr(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _library_objects(model: nn.Module) -> dict[int, str]:
    """id -> attribute path of the transformers objects (configs) the model's modules hold."""
    paths: dict[int, str] = {}
    for name, mod in model.named_modules():
        for k, v in vars(mod).items():
            if k.startswith("_") or isinstance(v, (nn.Module, torch.Tensor)):
                continue
            if type(v).__module__.startswith("transformers."):
                paths.setdefault(id(v), f"{name}.{k}" if name else k)
    return paths


def _trace_opaque(
    model: nn.Module,
    input_names: list[str] | None,
    kinds: dict[nn.Module, str | None],
    hf: bool,
    example_inputs: dict[str, Any] | None,
) -> fx.GraphModule:
    if input_names is None and example_inputs:
        input_names = list(example_inputs)
    if input_names is not None:
        names: list[str] | None = list(input_names)
    elif _root_takes_varargs(model):
        names = _default_input_names(model)
    else:
        names = None  # a plain signature (a GraphModule traced earlier): trace it as it is
    acts = {m for m, k in kinds.items() if k is not None}
    # Modules on the way to an activation are traced through; every other one is a leaf.
    through: set[nn.Module] = set()
    for m in model.modules():
        if any(x in acts for x in m.modules()):
            through.add(m)
    fixed: dict[str, Any] = {}
    try:
        params = _inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        params = {}
    if hf and names is not None and "use_cache" in params and "use_cache" not in names:
        fixed["use_cache"] = False  # a KV cache object cannot flow through a graph
    autowrap = _hf_autowrap() if hf else ()
    meta = {
        k: {"dtype": v.dtype, "device": v.device, "ndim": v.dim()}
        for k, v in (example_inputs or {}).items()
        if isinstance(v, torch.Tensor)
    }
    # Trace; when fx fails inside a submodule that holds no activation (attention, embeddings),
    # make that module (and every module of its class) a leaf and try again. Everything else
    # stays traced through, so the weight layers next to the activations are graph nodes.
    opaque: set[nn.Module] = set()
    while True:
        tracer = _Tracer(names, frozenset(opaque), fixed, autowrap, kinds=kinds)
        tracer.object_paths = _library_objects(model) if hf else {}
        tracer.input_meta = meta
        try:
            with warnings.catch_warnings(), _wrap_calls(tracer, through, autowrap):
                warnings.simplefilter("ignore")
                graph = tracer.trace(model)
            break
        except Exception as e:
            bad = _failing_module(e.__traceback__)
            if bad is None or bad in through or bad in opaque:
                raise
            new = {m for m in model.modules() if type(m) is type(bad) and m not in through} - opaque
            if not new:
                raise  # nothing left to make a leaf: give up rather than loop
            opaque.update(new)
    gm = _graph_module(tracer.root, graph, model.__class__.__name__)
    _bind_library_objects(gm, set(tracer.object_paths.values()))
    out_types = tracer.output_types
    cls = out_types[-1] if out_types else dict
    if issubclass(cls, dict) and cls is not dict:
        # fx records a ModelOutput as a plain dict: rebuild the class from its name.
        out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        with gm.graph.inserting_before(out):
            rebuilt = gm.graph.call_function(_rebuild_output, (cls.__module__, cls.__qualname__, out.args[0]))
        rebuilt.meta["is_wrapped"] = True  # kept as one call when torch.load re-traces the code
        out.args = (rebuilt,)
        gm.recompile()
    return gm
