"""SiteStats and EntropyStats: samples behind each site, its flip bound, the summaries."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import egp_fast
from egp_fast.errors import ConfigError
from egp_fast.measurement import flip_bound


def _const_net(bias: float = 100.0) -> nn.Module:
    """A conv whose ReLU is always ON (zero entropy) on any reasonable input."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    with torch.no_grad():
        net[0].weight.mul_(0.01)
        net[0].bias.fill_(bias)
    return net


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, True, "0.95", None, float("nan")])
def test_site_flip_bound_validates_confidence(bad):
    s = egp_fast.measure_entropy(_const_net(), [torch.randn(2, 3, 4, 4)], progress=False).sites["1"]
    with pytest.raises(ConfigError, match="confidence="):
        s.flip_bound(bad)
    moving = egp_fast.measure_entropy(nn.Sequential(nn.Linear(3, 8), nn.ReLU()), [torch.randn(64, 3)],
                                      progress=False).sites["1"]
    with pytest.raises(ConfigError, match="confidence="):  # also where the bound is 1.0 anyway
        moving.flip_bound(bad)


def test_samples_count_inputs_not_positions():
    net = _const_net()
    stats = egp_fast.measure_entropy(net, [torch.randn(5, 3, 4, 4), torch.randn(3, 3, 4, 4)], progress=False)
    s = stats.sites["1"]
    assert s.samples == 8 and stats.samples == 8
    assert s.observations == 8 * 16  # positions are observations, not samples
    assert s.collapsible
    assert s.flip_bound() == pytest.approx(1 - 0.05 ** (1 / 8))
    d = s.to_dict()
    assert d["samples"] == 8 and d["flip_bound_95"] == pytest.approx(s.flip_bound())
    assert stats.to_dict()["samples"] == 8 and stats.to_dict()["stopped_early"] is False


def test_flip_bound_is_invariant_to_batch_size():
    net = _const_net()
    x = torch.randn(16, 3, 4, 4)
    by1 = egp_fast.measure_entropy(net, list(x.split(1)), progress=False).sites["1"]
    by8 = egp_fast.measure_entropy(net, list(x.split(8)), progress=False).sites["1"]
    assert by1.samples == by8.samples == 16
    assert by1.flip_bound() == by8.flip_bound() == flip_bound(16)


def test_nonzero_entropy_site_bound_is_one():
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU())
    s = egp_fast.measure_entropy(net, [torch.randn(64, 3)], progress=False).sites["1"]
    assert not s.collapsible and s.flip_bound() == 1.0


def test_forced_zero_entropy_is_collapsible():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        net[1].bias.copy_(torch.tensor([50.0, -50.0, 50.0, -50.0]))
    s = egp_fast.measure_entropy(net, [torch.randn(4, 3, 5, 5)], progress=False)
    assert s.zero_entropy_sites() == ["2"]
    assert s.sites["2"].piece.tolist() == [1, 0, 1, 0]
    assert s.layer_entropy() == {"0": 0.0}
