"""Site discovery for measurement: cached per model, run on two samples, and the check of a
traced graph against ``model.forward``.

A second :func:`egp_fast.measure_entropy` on the same, unchanged model reuses the discovered
:class:`SiteGraph` (keyed on the model object and a cheap structure signature); discovery's
shape propagation runs on one sample of the example (two when the forward squeezes), not the
whole batch.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from egp_fast.errors import DataError
from egp_fast.graph import (
    SiteGraph,
    discover_sites,
    discover_sites_sampled,
    normalize_inputs,
    registered_activations,
    unwrap_model,
)
from egp_fast.measurement.batches import _tensors


# model -> (structure key, SiteGraph). Weak keys: the cache never keeps a model alive (the
# SiteGraph references the model's submodules, not the model object itself).
_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_DISCOVERY_SAMPLES = 2


def _structure_key(model: nn.Module, example: Any) -> tuple:
    """A cheap signature of what discovery depends on.

    Module identities and types in tree order (a swapped module, e.g. after ``linearize``, changes
    it), parameter shapes, and the layout of the example (dtypes and shapes past dim 0).
    """
    mods = tuple((id(m), type(m)) for m in model.modules())
    params = tuple(p.shape for p in model.parameters())
    args, kwargs = normalize_inputs(example)
    layout = tuple(
        (t.dtype, tuple(t.shape[1:]), t.device.type) if isinstance(t, torch.Tensor) else type(t).__name__
        for t in list(args) + [kwargs[k] for k in sorted(kwargs)]
    )
    return mods, params, tuple(sorted(kwargs)), layout, _registry_state()


def _registry_state() -> tuple:
    # register_activation changes which modules are sites: a registration discovers again.
    return tuple((id(c), k) for c, k in registered_activations().items())


def _few_samples(example: Any, n: int = _DISCOVERY_SAMPLES) -> Any:
    """``example`` cut to its first ``n`` samples (dim 0 of every tensor that has the batch's
    dim 0); ``example`` itself when that cuts nothing (``n`` or fewer samples)."""
    args, kwargs = normalize_inputs(example)
    first = _tensors(args) + _tensors(kwargs)
    if not first or first[0].dim() == 0 or first[0].shape[0] <= n:
        return example
    b = first[0].shape[0]

    def cut(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == b:
            return v[:n]
        return v

    if isinstance(example, torch.Tensor):
        return cut(example)
    if isinstance(example, Mapping):
        return {k: cut(v) for k, v in example.items()}
    return type(example)(cut(v) for v in example) if isinstance(example, tuple) else [cut(v) for v in example]


def _squeezes(gm: fx.GraphModule | None) -> bool:
    """Whether the traced forward calls ``squeeze`` without a dim (which would drop a batch
    dimension of 1); ``None`` (no trace: hooks run the real forward) counts as yes."""
    if gm is None:
        return True
    for n in gm.graph.nodes:
        if n.target in ("squeeze", torch.squeeze) and n.op in ("call_method", "call_function"):
            if len(n.args) < 2 and "dim" not in n.kwargs:
                return True
    return False


def _discover(model: nn.Module, example: Any) -> SiteGraph:
    """Discover with shapes recorded on one sample (shape propagation is a forward: one sample
    costs 1/B of one), two when the forward squeezes (so a batch dimension of 1 cannot vanish);
    fall back to the whole example when the model rejects the cut (e.g. a hard-coded batch)."""
    if _few_samples(example) is not example:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                graph = discover_sites_sampled(model, example, lambda gm: _few_samples(example, 2 if _squeezes(gm) else 1))
        except DataError as e:
            # Retry on the whole example only when the cut itself is the likely cause (a shape
            # error); any other failure is the model's own and must reach the user.
            if not _looks_like_shape_error(e.__cause__):
                raise
            return discover_sites(model, example)
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return graph
    return discover_sites(model, example)


_SHAPE_WORDS = ("shape", "size", "dimension", "batch", "view", "reshape", "mismatch", "expected")


def _looks_like_shape_error(e: BaseException | None) -> bool:
    return isinstance(e, (RuntimeError, ValueError, IndexError)) and any(
        w in str(e).lower() for w in _SHAPE_WORDS
    )


def cached_graph(model: nn.Module, example_inputs: Any) -> SiteGraph:
    """The :class:`SiteGraph` of ``model``, discovered once and reused while it is unchanged.

    The cache is keyed on the model object and a structure signature (module identities and
    types, parameter shapes, the example's layout), so replacing a module (``linearize``,
    ``collapse``, swapping layers) or feeding another input layout discovers again.

    Args:
        model: the network.
        example_inputs: a batch it accepts (see :func:`discover_sites`).

    Returns:
        The (possibly cached) :class:`SiteGraph`.

    Raises:
        ModelError: the model has no supported activation.
        DataError: the model rejects ``example_inputs``.

    Example:
        >>> import torch, egp_fast
        >>> from egp_fast.measurement import cached_graph
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
        >>> cached_graph(net, torch.randn(3, 4)) is cached_graph(net, torch.randn(5, 4))
        True
    """
    model = unwrap_model(model)
    key = _structure_key(model, example_inputs)
    hit = _GRAPHS.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    graph = _discover(model, example_inputs)
    _GRAPHS[model] = (key, graph)
    return graph


# --------------------------------------------------------------------------------------------
# Checking the traced graph against the real model.

_RTOL, _ATOL = 1e-4, 1e-5


def _compare_outputs(real: Any, traced: Any) -> str | None:
    """None when the two outputs agree (structure, shapes, dtypes, allclose); else why not."""
    a, b = _tensors(real), _tensors(traced)
    if len(a) != len(b):
        return f"model.forward returned {len(a)} tensor(s), the traced graph {len(b)}"
    for k, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape or x.dtype != y.dtype:
            return (
                f"output tensor {k}: model.forward gave {x.dtype} {list(x.shape)}, the traced "
                f"graph {y.dtype} {list(y.shape)}"
            )
        if x.is_floating_point() or x.is_complex():
            same = torch.allclose(x, y, rtol=_RTOL, atol=_ATOL, equal_nan=True)
        else:
            same = torch.equal(x, y)
        if not same:
            diff = (x.to(torch.float64) - y.to(torch.float64)).abs().nan_to_num(float("inf")).max()
            return f"output tensor {k} differs (max abs difference {float(diff):.3g})"
    return None
