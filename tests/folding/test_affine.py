"""ChannelAffine and site_affine: the per-channel affine map of each activation kind's pieces."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from egp_fast.errors import ConfigError
from egp_fast.folding import ChannelAffine, site_affine


@pytest.mark.parametrize(
    "kind, params, piece, scale, shift",
    [
        ("relu", {}, [0, 1], [0.0, 1.0], [0.0, 0.0]),
        ("gelu", {}, [1, 0], [1.0, 0.0], [0.0, 0.0]),
        ("silu", {}, [1], [1.0], [0.0]),
        ("leaky_relu", {"negative_slope": 0.2}, [0, 1], [0.2, 1.0], [0.0, 0.0]),
        ("relu6", {"min_val": 0.0, "max_val": 6.0}, [0, 1, 2], [0.0, 1.0, 0.0], [0.0, 0.0, 6.0]),
        ("hardtanh", {"min_val": -2.0, "max_val": 3.0}, [0, 1, 2], [0.0, 1.0, 0.0], [-2.0, 0.0, 3.0]),
    ],
)
def test_site_affine_pieces(kind, params, piece, scale, shift):
    s, t = site_affine(kind, torch.tensor(piece), params, dtype=torch.float64)
    assert s.tolist() == scale and t.tolist() == shift


def test_site_affine_prelu_and_errors():
    s, t = site_affine("prelu", torch.tensor([0, 1, 0]), prelu_weight=torch.tensor([0.1, 0.2, 0.3]))
    assert torch.allclose(s, torch.tensor([0.1, 1.0, 0.3])) and not t.any()
    with pytest.raises(ConfigError):
        site_affine("relu", torch.tensor([0, -1]))
    with pytest.raises(ConfigError):
        site_affine("prelu", torch.tensor([0]))
    with pytest.raises(ConfigError):
        site_affine("tanh", torch.tensor([0]))


@pytest.mark.parametrize("act", [nn.ReLU(), nn.LeakyReLU(0.3), nn.PReLU(5), nn.ReLU6(), nn.Hardtanh(-1.0, 2.0)])
@pytest.mark.parametrize("shift", [-40.0, 40.0, 0.5])
def test_channel_affine_matches_activation_on_constant_pieces(act, shift):
    # Every channel sits in one piece (constant input, or far from the breakpoints).
    x = torch.randn(8, 5, 3) * 0.1 + shift
    piece = torch.full((5,), -1)
    bps = (0.0,) if not isinstance(act, nn.Hardtanh) else (act.min_val, act.max_val)
    for c in range(5):
        v = x[:, c]
        p = int(sum(bool((v > b).all()) for b in bps))
        assert all(bool((v > b).all()) or bool((v <= b).all()) for b in bps)
        piece[c] = p
    kind = {nn.ReLU6: "relu6", nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.PReLU: "prelu",
            nn.Hardtanh: "hardtanh"}[type(act)]
    params = {"negative_slope": 0.3} if kind == "leaky_relu" else {}
    if isinstance(act, nn.Hardtanh):
        params = {"min_val": act.min_val, "max_val": act.max_val}
    s, t = site_affine(kind, piece, params, act.weight if kind == "prelu" else None)
    aff = ChannelAffine(s, t, channel_dim=1)
    assert torch.allclose(aff(x), act(x).detach(), atol=1e-6)
