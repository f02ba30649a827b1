"""PackedMask (1 bit per entry) and set_masks' hand-over of masks (issue 21)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from egp_fast import masks
from egp_fast.errors import ConfigError


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (3, 5), (4, 3, 3, 3), (2, 1, 17)])
def test_packed_mask_round_trips(shape):
    g = torch.Generator().manual_seed(len(shape) * 31 + shape[-1])
    m = torch.rand(shape, generator=g) < 0.5
    p = masks.PackedMask(m)
    assert p.shape == shape and p.bits.numel() == (m.numel() + 7) // 8
    assert torch.equal(p.unpack(), m)


def test_packed_mask_of_a_transposed_mask():
    m = (torch.rand(6, 5) < 0.3).t()
    assert not m.is_contiguous()
    assert torch.equal(masks.PackedMask(m).unpack(), m)


def test_set_masks_takes_packed_masks_and_hands_over():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
    twin = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
    twin.load_state_dict(net.state_dict())
    new = {"0": torch.rand(7, 5) < 0.5, "1": torch.rand(3, 7) < 0.5}
    masks.set_masks(twin, dict(new))
    given = {"0": masks.PackedMask(new["0"]), "1": new["1"]}
    masks.set_masks(net, given, take=True)
    assert given == {}
    for k, v in twin.state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k


def test_set_masks_rejects_a_packed_mask_of_another_shape():
    net = nn.Sequential(nn.Linear(5, 7))
    before = net[0].weight.detach().clone()
    with pytest.raises(ConfigError, match="PackedMask"):
        masks.set_masks(net, {"0": masks.PackedMask(torch.ones(5, 7, dtype=torch.bool))})
    assert torch.equal(net[0].weight, before) and not hasattr(net[0], "weight_mask")


def test_take_needs_a_dict():
    from types import MappingProxyType

    net = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="dict"):
        masks.set_masks(net, MappingProxyType({"0": torch.ones(2, 2, dtype=torch.bool)}), take=True)


@pytest.mark.parametrize("extra", [0, 1, 7, 8, 9])
def test_packed_mask_across_slices(monkeypatch, extra):
    """Packing and unpacking work a slice at a time: masks spanning several slices, with a tail."""
    from egp_fast.masks import core

    monkeypatch.setattr(core, "_SLICE", 64)  # the module holding PackedMask
    n = 3 * 64 + 16 + extra
    g = torch.Generator().manual_seed(n)
    m = torch.rand(n, generator=g) < 0.5
    p = masks.PackedMask(m)
    want = sum(int(b) << j for j, b in enumerate(m[:8].tolist()))
    assert int(p.bits[0]) == want
    assert torch.equal(p.unpack(), m)
    out = torch.ones(n, dtype=torch.bool)
    p.unpack_into(out)
    assert torch.equal(out, m)
    with pytest.raises(Exception, match="contiguous bool"):
        p.unpack_into(torch.ones(n + 1, dtype=torch.bool))
