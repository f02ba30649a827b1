"""Masks: which weights are pruned, kept at exactly zero through training and checkpoints.

Stage 2 of the package (imports only ``errors``, ``_ext`` and ``ops``).
"""

from egp_fast.masks.core import (
    MASK,
    attach_masks,
    enforce,
    load_pruned_state_dict,
    masked_layers,
    rebind,
    release,
    set_masks,
    sparsity,
    strip_masks,
)
from egp_fast.masks.linear import MaskedLinear

__all__ = [
    "MASK",
    "MaskedLinear",
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
