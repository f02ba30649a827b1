"""Small models and optimizers shared by the masks tests (tests/masks/)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import egp_fast
from egp_fast import _ext, masks
from egp_fast.masks import guard


def net():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def prune_half(model):
    egp_fast.attach_masks(model, ["0", "2"])
    new = egp_fast.ops.select_smallest(
        [model[0].weight, model[2].weight], [model[0].weight_mask, model[2].weight_mask], [24, 12]
    )
    masks.set_masks(model, {"0": new[0], "2": new[1]})


def make_opt(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-2)
    if kind == "adam":
        return torch.optim.Adam(params, lr=0.05, weight_decay=1e-2)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=0.05, weight_decay=1e-2)
    if kind == "adamw_fused":  # what build_optimizer gives on CPU/CUDA
        return torch.optim.AdamW(params, lr=0.05, weight_decay=1e-2, fused=True)
    if kind == "sgd_subclass":  # not a known elementwise class: re-zeroed after every step

        class MySGD(torch.optim.SGD):
            pass

        return MySGD(params, lr=0.05, momentum=0.9, weight_decay=1e-2)
    raise AssertionError(kind)


def extension_kernel():
    """The extension's CPU zero_pruned_ when the extension is built, else skip the test.

    With the extension loaded the masks must zero through it: a build where masks fell back to
    the bit mask (``_cpu_zero_kernel()`` returning None) fails here instead of skipping.
    """
    if not _ext.HAS_CPP:
        pytest.skip(f"the compiled extension is not built ({_ext.LOAD_ERROR})")
    kernel = torch.ops.egp_fast.zero_pruned_.default
    assert guard._ZERO_PRUNED is kernel, (
        f"egp_fast._C is loaded but the masks zero pruned entries with {guard._ZERO_PRUNED!r}, "
        "not the extension's zero_pruned_")
    return kernel
