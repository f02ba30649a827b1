"""Example inputs: normalising a batch, binding it to a traced graph's inputs, eval mode.

Site discovery, tracing and measurement all take the model's inputs in the forms a data
loader gives them (a tensor, a tuple of positional inputs, a dict of keyword inputs); the
helpers here turn those into ``(args, kwargs)``, name them after the forward's arguments, and
run the model in eval mode with its training flags restored.
"""

from __future__ import annotations

import contextlib
import inspect as _inspect
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from egp_fast.errors import DataError

# Keys of a dict batch that hold targets, never model inputs.
LABEL_KEYS = ("label", "labels", "target", "targets", "y")


def normalize_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` from a tensor, a tuple/list of positional args, or a dict of kwargs.

    Label keys of a dict (``label``, ``labels``, ``target``, ``targets``, ``y``) are dropped, as
    :func:`egp_fast.measurement.split_batch` drops them from data batches: a batch of a Hugging Face
    loader can serve as example inputs, and the traced model does not require labels.
    """
    if example_inputs is None:
        raise DataError(
            "example_inputs is None; pass a batch the model accepts (a tensor, a tuple of "
            "positional inputs, or a dict of keyword inputs)"
        )
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), {k: v for k, v in example_inputs.items() if k not in LABEL_KEYS}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise DataError(
        f"example_inputs has type {type(example_inputs).__name__}; pass a tensor, a tuple of "
        "positional inputs, or a dict of keyword inputs"
    )


def placeholder_args(
    model: nn.Module, gm: fx.GraphModule, args: tuple, kwargs: dict
) -> tuple[list[Any], list[str]]:
    """Positional values for the graph's placeholders, binding kwargs by name."""
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    if not kwargs:
        if len(args) > len(names) and not any(n.startswith("*") for n in names):
            raise DataError(
                f"example_inputs gives {len(args)} positional inputs, but the model takes "
                f"{len(names)} ({', '.join(names) or 'none'}); for a data batch (inputs, labels), pass "
                "its inputs only"
            )
        return list(args), names
    sig = _inspect.signature(model.forward)
    bound = sig.bind_partial(*args, **kwargs)
    bound.apply_defaults()
    values = []
    for n in names:
        key = n.lstrip("*")
        if key not in bound.arguments:
            if key in LABEL_KEYS:
                raise DataError(
                    f"the model input {key!r} has a name egp_fast reserves for labels: the keys "
                    f"{', '.join(LABEL_KEYS)} of a dict batch are dropped as targets. Wrap the model "
                    f"so that this input has another name (a module whose forward(self, ..., "
                    f"{key}_input) calls model(..., {key}={key}_input)) and rename the key in your batches"
                )
            raise DataError(f"example_inputs gives no value for the model input {key!r}")
        values.append(bound.arguments[key])
    return values, names


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no_grad inside; every module's own training flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        if any(t for _, t in flags):  # already in eval mode: nothing to switch (or to restore)
            model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, t in flags:
            if m.training != t:  # nn.Module.__setattr__ is slow: touch only what changed
                m.training = t


def describe_inputs(args: tuple, kwargs: dict) -> str:
    def one(v: Any) -> str:
        return f"tensor{list(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return ", ".join(parts) or "no inputs"


def _input_names(model: nn.Module, args: tuple, kwargs: dict) -> list[str] | None:
    """The forward's argument names the example inputs fill (positional first), or None."""
    names: list[str] = []
    if args:
        try:
            sig = _inspect.signature(model.forward)
        except (TypeError, ValueError):
            return None
        pos = [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(pos) < len(args):
            return None
        names = pos[: len(args)]
    return names + [k for k in kwargs if k not in names]


def _named_inputs(model: nn.Module, example_inputs: Any) -> dict[str, Any]:
    if example_inputs is None:
        return {}
    try:
        args, kwargs = normalize_inputs(example_inputs)
    except DataError:
        return {}
    names = _input_names(model, args, kwargs) or []
    values = list(args) + [kwargs[k] for k in names[len(args):]]
    return dict(zip(names, values))
