"""Masks: which weights are pruned, kept at exactly zero through training and checkpoints.

Stage 2 of the package (imports only ``errors``, ``_ext`` and ``ops``). ``core`` holds the API
(attach, set, enforce, load, strip, sparsity), ``guard`` the per-layer gradient guard and the
CPU zeroing, ``optim`` the optimizer step hooks, ``linear`` :class:`MaskedLinear`.
"""

from egp_fast.masks.core import (
    PackedMask,
    attach_masks,
    enforce,
    load_pruned_state_dict,
    masked_layers,
    set_masks,
    sparsity,
    strip_masks,
)
from egp_fast.masks.guard import MASK, rebind, release
from egp_fast.masks.linear import MaskedLinear

__all__ = [
    "MASK",
    "MaskedLinear",
    "PackedMask",
    "attach_masks",
    "enforce",
    "load_pruned_state_dict",
    "masked_layers",
    "rebind",
    "release",
    "set_masks",
    "sparsity",
    "strip_masks",
]
