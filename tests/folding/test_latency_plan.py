"""fold="latency" is never slower than fold="auto": the chain plan departs from the FLOPs plan
only for a saving above the timing noise and a margin, and collapse keeps the latency-planned
model only when the whole model is faster (planted tables: deterministic, nothing is timed).
Residual additions: a chain whose output is added to its own input merges into one layer
with the identity in its kernel centre, checked against the uncollapsed model."""

from __future__ import annotations

import pytest
import torch
from _collapse_helpers import kinds, rel
from test_chain_plan import Bottleneck, InvertedResidual, Table, _collapse, _convs, _linearised
from torch import nn

from egp_fast.folding import flops_cost, plan_chain


def _bottleneck(seed=3):
    torch.manual_seed(seed)
    x = torch.randn(2, 32, 8, 8)
    return _linearised(Bottleneck(32, 8), x, ["relu1", "relu2"]), x


def _chain(c=16, w=4, size=7):
    """A bottleneck chain 1x1 C->W, 3x3 W->W, 1x1 W->C: FLOPs keep it apart (9C^2 > 2CW + 9W^2)."""
    mods = [nn.Conv2d(c, w, 1), nn.Conv2d(w, w, 3, padding=1), nn.Conv2d(w, c, 1)]
    shapes = [((1, c, size, size), (1, w, size, size)), ((1, w, size, size), (1, w, size, size)),
              ((1, w, size, size), (1, c, size, size))]
    return mods, [s[0] for s in shapes], [s[1] for s in shapes]


@pytest.mark.parametrize("merged,noise,margin,departs", [
    (1.0, 0.0, 0.05, True),     # 29 of 30 saved: a real saving
    (29.9, 0.0, 0.05, False),   # 0.3% saved: below the margin
    (20.0, 0.0, 0.5, False),    # 33% saved, margin 50%
    (20.0, 6.0, 0.0, False),    # saving 10 < noise 4 x 6 (4 segments differ: 3 singles, 1 merged)
    (20.0, 2.0, 0.0, True),     # saving 10 > noise 4 x 2
])
def test_plan_departs_from_flops_only_beyond_noise_and_margin(merged, noise, margin, departs):
    mods, i, o = _chain()
    table = Table(lambda s: merged if s.merged else 10.0, noise=noise)
    p = plan_chain(mods, i, o, False, table, reference=flops_cost, margin=margin)
    # FLOPs keep the three layers apart; the table merges them into one (if it departs).
    assert p["reference_segments"] == [(0, 0), (1, 1), (2, 2)]
    assert p["reference_cost"] == 30.0 and p["saving"] == pytest.approx(30.0 - merged)
    # The two plans differ in 4 segments (three singles against one merged layer).
    assert p["noise"] == pytest.approx(4 * noise)
    assert p["departed"] is departs
    assert p["segments"] == ([(0, 2)] if departs else [(0, 0), (1, 1), (2, 2)])
    assert p["cost"] == pytest.approx(merged if departs else 30.0)


def test_table_with_no_real_saving_falls_back_to_the_auto_plan():
    net, x = _bottleneck()
    auto = _collapse(net, x, exact=False, fold="auto", measure_latency=False)
    table = Table(lambda s: 29.5 if s.merged else 10.0)  # 1.7% saved, under LatencyCost's 5%
    table.margin = 0.05
    lat = _collapse(net, x, exact=False, fold="latency", measure_latency=False, cost=table)
    chain = lat.plan["chains"][0]
    assert not chain["departed"] and chain["segments"] == chain["reference_segments"]
    assert table.confirmed == 0 and lat.plan["used"] == "latency" and "fallback" not in lat.plan
    assert len(_convs(lat.model)) == len(_convs(auto.model)) == 3
    with torch.no_grad():
        assert torch.equal(lat.model(x), auto.model(x))


def test_latency_plan_not_faster_as_a_whole_falls_back_to_auto():
    net, x = _bottleneck()
    auto = _collapse(net, x, exact=False, fold="auto", measure_latency=False)
    table = Table(lambda s: 1.0 if s.merged else 10.0, faster=False)
    lat = _collapse(net, x, exact=False, fold="latency", measure_latency=False, cost=table)
    assert lat.plan["chains"][0]["departed"] and table.confirmed == 1
    assert lat.plan["used"] == "auto" and "not faster" in lat.plan["fallback"]
    assert lat.plan["auto_chains"][0]["segments"] == [["conv1", "bn1"], ["conv2", "bn2"], ["conv3", "bn3"]]
    assert len(_convs(lat.model)) == 3 and "compose_conv" not in kinds(lat)
    assert lat.after["flops"] == auto.after["flops"] <= lat.before["flops"]
    with torch.no_grad():
        assert torch.equal(lat.model(x), auto.model(x))
        assert rel(net(x), lat.model(x)) < 1e-5


def test_residual_addition_is_priced_in_the_plan():
    mods, i, o = _chain()
    # The merged layer costs 31 against 30 for the three apart, but absorbs an addition worth 2.
    table = Table(lambda s: 31.0 if s.merged else 10.0)
    table.add = lambda shape: 2.0
    plain = plan_chain(mods, i, o, False, table)
    res = plan_chain(mods, i, o, False, table, residual=(1, 16, 7, 7))
    assert plain["segments"] == [(0, 0), (1, 1), (2, 2)] and not plain["residual"]
    assert res["segments"] == [(0, 2)] and res["residual"] and res["cost"] == 31.0 and res["unmerged"] == 32.0
    table.add = lambda shape: 0.5
    assert plan_chain(mods, i, o, False, table, residual=(1, 16, 7, 7))["segments"] == [(0, 0), (1, 1), (2, 2)]
    # A chain whose merged layer cannot hold the identity (stride 2) does not count the addition.
    strided = [nn.Conv2d(4, 6, 1), nn.Conv2d(6, 4, 3, stride=2, padding=1)]
    p = plan_chain(strided, [(1, 4, 8, 8), (1, 6, 8, 8)], [(1, 6, 8, 8), (1, 4, 4, 4)], False, table,
                   residual=(1, 4, 4, 4))  # (the shape a caller would pass; the merged layer decides)
    assert not p["residual"] and p["add_cost"] == 0.0


def test_inverted_residual_exact_when_the_expansion_has_no_bias():
    torch.manual_seed(5)
    x = torch.randn(3, 8, 9, 9)
    net = _linearised(InvertedResidual(8), x, ["act1", "act2"])
    with torch.no_grad():  # the folded 1x1 expansion has no bias: its zero padding is exact
        net.bn1.bias.zero_(), net.bn1.running_mean.zero_()
        y = net(x)
    out = _collapse(net, x, exact=True, fold="auto", measure_latency=False)
    assert len(_convs(out.model)) == 1 and out.exact
    assert out.plan["chains"][0]["residual"] and "residual_identity" in kinds(out)
    xs = torch.randn(4, 8, 9, 9)
    with torch.no_grad():
        assert torch.allclose(out.model(x), y, atol=1e-5, rtol=1e-4)
        assert torch.allclose(out.model(xs), net(xs), atol=1e-5, rtol=1e-4)


class BasicBlock(nn.Module):
    """ResNet basic block: 3x3, BN, ReLU, 3x3, BN, + shortcut (1x1 stride-2 conv + BN when
    downsampling), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu(y + (x if self.down is None else self.down(x)))


@pytest.mark.parametrize("cin,cout,stride", [(6, 6, 1), (4, 6, 2)])
def test_basic_block_merges_with_its_shortcut(cin, cout, stride):
    torch.manual_seed(6)
    x = torch.randn(2, cin, 12, 12)
    net = _linearised(BasicBlock(cin, cout, stride), x, ["relu1"])
    xs = torch.randn(3, cin, 12, 12)
    with torch.no_grad():
        y, ys = net(x), net(xs)
    merged = _collapse(net, x, exact=False, fold="always", measure_latency=False)
    convs = _convs(merged.model)
    assert len(convs) == 1 and merged.after["longest_path"] == 1
    k = 5 if stride == 1 else 7  # 3x3 then 3x3 (the second at twice the first's stride)
    assert convs[0].kernel_size == (k, k) and convs[0].stride == (stride, stride)
    assert ("residual_identity" if stride == 1 else "residual_parallel") in kinds(merged)
    e = 1  # the outer ring of outputs reads the zero padding
    with torch.no_grad():  # exact away from the border (two zero-padded convs composed)
        for inp, ref in ((x, y), (xs, ys)):
            got = merged.model(inp)
            assert torch.allclose(got[..., e:-e, e:-e], ref[..., e:-e, e:-e], atol=1e-5, rtol=1e-4)
    # FLOPs: the merged kxk costs more than two 3x3 convs, so auto keeps them apart, exactly.
    auto = _collapse(net, x, exact=False, fold="auto", measure_latency=False)
    assert len(_convs(auto.model)) == (2 if stride == 1 else 3) and auto.after["flops"] <= auto.before["flops"]
    with torch.no_grad():
        assert torch.allclose(auto.model(xs), ys, atol=1e-5, rtol=1e-4)
