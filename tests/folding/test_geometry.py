"""Kernel composition: the conv of two convs, checked on its span and through collapse."""

from __future__ import annotations

import pytest
import torch
from _collapse_helpers import kinds, rel, stats_of
from torch import nn

from egp_fast.folding import collapse, compose_conv_weight, layer_flops


@pytest.mark.parametrize(
    "k1, k2, s1, s2, d1, d2, g1, g2, p1",
    [
        (3, 3, 1, 1, 1, 1, 1, 1, 1),
        (3, 5, 2, 1, 1, 1, 1, 1, 0),
        (5, 3, 1, 2, 2, 1, 1, 1, 2),
        (3, 3, 2, 3, 1, 2, 1, 1, 1),
        (1, 3, 1, 1, 1, 1, 1, 1, 0),
        (3, 1, 1, 1, 1, 1, 3, 3, 1),  # equal groups
        (3, 1, 1, 1, 1, 1, 6, 1, 1),  # depthwise then dense pointwise
        (1, 3, 1, 1, 1, 1, 1, 6, 0),  # pointwise then depthwise
        (2, 3, 3, 1, 1, 3, 3, 1, 0),  # even kernel
    ],
)
def test_compose_conv_exact_without_second_padding(k1, k2, s1, s2, d1, d2, g1, g2, p1):
    torch.manual_seed(1)
    cin, mid, cout = 6, 6, 12 if g2 == 1 else 6
    c1 = nn.Conv2d(cin, mid, k1, stride=s1, dilation=d1, padding=p1, groups=g1)
    c2 = nn.Conv2d(mid, cout, k2, stride=s2, dilation=d2, padding=0, groups=g2)
    x = torch.randn(2, cin, 31, 29)
    net = nn.Sequential(c1, nn.ReLU(), c2)
    with torch.no_grad():
        c1.bias += 100.0  # always ON: the site is the identity
    st = stats_of(net, x)
    out = collapse(net, st, x, fold="always", measure_latency=False, max_flip=1.0)
    assert "compose_conv" in kinds(out) and out.exact
    assert out.after["longest_path"] == 1
    assert rel(net(x), out.model(x)) < 1e-5


def test_compose_conv_weight_span():
    w1 = torch.randn(4, 3, 3, 3)
    w2 = torch.randn(5, 4, 3, 3)
    w = compose_conv_weight(w1, w2, (2, 2), (1, 1), (2, 2))
    assert w.shape == (5, 3, 11, 11)  # (3-1)*1 + (3-1)*2*2 + 1


def test_layer_flops_counts_two_per_multiply_add():
    conv = nn.Conv2d(6, 8, 3, groups=2)
    assert layer_flops(conv, (2, 8, 5, 5)) == 2 * (2 * 8 * 5 * 5) * (3 * 3 * 3)
    assert layer_flops(nn.Linear(4, 3), (5, 3)) == 2 * 5 * 3 * 4
    assert layer_flops(nn.ReLU(), (5, 3)) == 0
