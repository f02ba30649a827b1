"""What one batch holds: the model's inputs, their device and how many samples they are.

A batch is a tensor, an ``(inputs, *labels)`` tuple or list, or a dict of keyword inputs
(label keys dropped); :func:`split_batch` turns it into the ``(args, kwargs)`` the model is
called with, :func:`batch_size` counts its samples (the unit of the flip bound, see
docs/algorithm.md, "How sure is \"zero entropy\"?") and :func:`model_device` names the device
the batches must be on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from egp_fast.errors import DataError
from egp_fast.graph import LABEL_KEYS


def _tensors(x: Any) -> list[torch.Tensor]:
    """Every tensor in ``x`` (nested tuples, lists and mappings), in order."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def split_batch(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The model inputs of one batch, as ``(args, kwargs)``.

    Rule: a tensor is the input; a tuple or list is ``(input, *labels)`` and only its first
    element is passed; a dict is passed as keyword arguments, minus the label keys
    ``label, labels, target, targets, y``.
    """
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise DataError("a batch is an empty tuple/list; yield (inputs, labels) or inputs")
        return (batch[0],), {}
    if isinstance(batch, Mapping):
        return (), {k: v for k, v in batch.items() if k not in LABEL_KEYS}
    raise DataError(
        f"a batch has type {type(batch).__name__}; data must yield tensors, (inputs, labels) "
        "tuples, or dicts of keyword inputs"
    )


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model with neither."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _check_device(args: tuple, kwargs: dict, device: torch.device, index: int) -> None:
    for t in _tensors(args) + _tensors(kwargs):
        if t.device != device:
            raise DataError(
                f"batch {index} is on {t.device} but the model is on {device}; move the data "
                f"to the model's device (e.g. x.to('{device}')) or the model to the data's"
            )


def batch_size(args: tuple, kwargs: dict) -> int:
    """Samples in one batch: dim 0 of the first input tensor (1 for a 0-d tensor, 0 if none)."""
    for t in _tensors(args) + _tensors(kwargs):
        return int(t.shape[0]) if t.dim() else 1
    return 0


__all__ = ["batch_size", "model_device", "split_batch"]
