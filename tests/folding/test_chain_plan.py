"""Chain-level fold planning (egp_fast.folding.plan): a run of layers joined by removed sites is
planned as a whole, so merges that pay only as a chain (MobileNetV2's inverted residual) happen,
merges that cost more (a ResNet-50 bottleneck) do not, and fold="latency" follows its costs."""

from __future__ import annotations

import pytest
import torch
from _collapse_helpers import kinds, rel, stats_of
from torch import nn

from egp_fast.folding import LayerSpec, collapse, flops_cost, layer_flops, linearize, plan_chain


class InvertedResidual(nn.Module):
    """MobileNetV2 block, stride 1: 1x1 C->6C, BN, act; dw3x3, BN, act; 1x1 6C->C, BN; + x."""

    def __init__(self, c: int = 8, t: int = 6) -> None:
        super().__init__()
        h = c * t
        self.pw = nn.Conv2d(c, h, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(h)
        self.act1 = nn.ReLU6()
        self.dw = nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False)
        self.bn2 = nn.BatchNorm2d(h)
        self.act2 = nn.ReLU6()
        self.pwl = nn.Conv2d(h, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + self.bn3(self.pwl(self.act2(self.bn2(self.dw(self.act1(self.bn1(self.pw(x))))))))


class Bottleneck(nn.Module):
    """ResNet-50 bottleneck: 1x1 C->W, 3x3 W->W, 1x1 W->C, each with BN; ReLU inside and after."""

    def __init__(self, c: int = 32, w: int = 8) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(c, w, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
        self.conv3, self.bn3 = nn.Conv2d(w, c, 1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(y)))
        return self.relu(x + self.bn3(self.conv3(y)))


def _randomise_bn(net: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


_STATS: dict[int, object] = {}


def _linearised(net: nn.Module, x: torch.Tensor, sites: list[str]) -> nn.Module:
    net.eval()
    _randomise_bn(net)
    st = stats_of(net, x)
    linearize(net, st, sites, how="identity")
    _STATS[id(net)] = st  # measured before linearising (the linearised block has no site left)
    return net


def _collapse(net: nn.Module, x: torch.Tensor, **kw):
    """Collapse only what was linearised already (sites=[]: no zero-entropy site is chosen)."""
    return collapse(net, _STATS[id(net)], x, sites=[], **kw)


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_inverted_residual_becomes_one_dense_conv():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 10, 10)
    net = _linearised(InvertedResidual(8), x, ["act1", "act2"])
    with torch.no_grad():
        y = net(x)
    out = _collapse(net, x, exact=False, fold="auto", measure_latency=False)
    convs = _convs(out.model)
    assert len(convs) == 1
    c = convs[0]
    assert (c.in_channels, c.out_channels, c.kernel_size, c.groups) == (8, 8, (3, 3), 1)
    assert "residual_identity" in kinds(out) and out.after["longest_path"] == 1
    assert out.after["flops"] < out.before["flops"]
    with torch.no_grad():
        d = (y - out.model(x)).abs()
    assert float(d[..., 1:-1, 1:-1].max()) < 1e-4 * float(y.abs().max())  # exact on the interior
    chain = out.plan["chains"][0]
    assert chain["metric"] == "flops" and chain["predicted"] < chain["unmerged"]
    assert chain["segments"] == [["pw", "bn1", "dw", "bn2", "pwl", "bn3"]]
    # One pair at a time (the first pair alone costs more than its parts) this merge is missed:
    # the pairwise price of 1x1 -> dw3x3 is a dense 3x3 C->6C.
    pw, dw = LayerSpec("conv", 8, 48, (1, 1), (1, 1), (0, 0), (1, 1), 1, (2, 8, 10, 10), (2, 48, 10, 10)), \
        LayerSpec("conv", 48, 48, (3, 3), (1, 1), (1, 1), (1, 1), 48, (2, 48, 10, 10), (2, 48, 10, 10))
    pair = LayerSpec("conv", 8, 48, (3, 3), (1, 1), (1, 1), (1, 1), 1, (2, 8, 10, 10), (2, 48, 10, 10), True)
    assert pair.flops > pw.flops + dw.flops


def test_exact_true_refuses_border_and_says_so():
    torch.manual_seed(1)
    x = torch.randn(2, 8, 10, 10)
    net = _linearised(InvertedResidual(8), x, ["act1", "act2"])
    with torch.no_grad():
        y = net(x)
    out = _collapse(net, x, exact=True, fold="auto", measure_latency=False)
    assert len(_convs(out.model)) == 3 and "compose_conv" not in kinds(out)
    assert any("zero-padded" in e.get("reason", "") for e in out.left)
    assert out.plan["chains"][0]["border_refused"]
    assert rel(y, out.model(x)) < 1e-5


def test_bottleneck_left_unmerged_auto_never_raises_flops():
    torch.manual_seed(2)
    x = torch.randn(2, 32, 8, 8)
    net = _linearised(Bottleneck(32, 8), x, ["relu1", "relu2"])
    auto = _collapse(net, x, exact=False, fold="auto", measure_latency=False)
    always = _collapse(net, x, exact=False, fold="always", measure_latency=False)
    assert always.after["flops"] > always.before["flops"]
    assert auto.after["flops"] <= auto.before["flops"]
    assert len(_convs(auto.model)) == 3 and "compose_conv" not in kinds(auto)
    with torch.no_grad():
        assert rel(net(x), auto.model(x)) < 1e-5


@pytest.mark.parametrize("seed", range(6))
def test_plan_never_costs_more_than_unmerged(seed):
    g = torch.Generator().manual_seed(seed)

    def r(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=g))

    n = r(2, 5)
    c = r(2, 12)
    mods, shapes = [], []
    size = 9
    for _ in range(n):
        cout, k = r(1, 24), [1, 3][r(0, 2)]
        groups = c if (k == 3 and r(0, 2) and cout == c) else 1
        mods.append(nn.Conv2d(c, cout, k, padding=k // 2, groups=groups))
        shapes.append(((1, c, size, size), (1, cout, size, size)))
        c = cout
    p = plan_chain(mods, [s[0] for s in shapes], [s[1] for s in shapes], False, flops_cost)
    assert p["cost"] <= p["unmerged"]
    assert p["cost"] == pytest.approx(sum(p["segment_costs"]))
    assert [i for s in p["segments"] for i in range(s[0], s[1] + 1)] == list(range(n))
    # The DP is optimal: no partition into consecutive segments is cheaper.
    best = brute(mods, shapes)
    assert p["cost"] == pytest.approx(best)


def brute(mods, shapes):
    """Cheapest partition found by trying every set of split points."""
    n = len(mods)
    best = float("inf")
    for mask in range(1 << (n - 1)):
        cuts = [0] + [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
        best = min(best, sum(layer_flops(mods[a], shapes[a][1]) if b - a == 1 else _whole_cost(mods[a:b], shapes[a:b])
                             for a, b in zip(cuts, cuts[1:])))
    return best


def _whole_cost(mods, shapes):
    # Force one segment: every single layer priced at infinity, merged layers by FLOPs.
    p = plan_chain(mods, [s[0] for s in shapes], [s[1] for s in shapes], False,
                   lambda s: flops_cost(s) if s.merged and s.in_shape == shapes[0][0]
                   and s.out_shape == shapes[-1][1] else float("inf"))
    return p["cost"] if p["segments"] == [(0, len(mods) - 1)] else float("inf")


class Table:
    """A planted latency table: prices, no noise, and a fixed answer to the whole-model check."""

    def __init__(self, price, faster: bool = True, noise: float = 0.0, margin: float = 0.0) -> None:
        self.price, self.faster, self._noise, self.margin = price, faster, noise, margin
        self.confirmed = 0

    def __call__(self, spec):
        return self.price(spec)

    def noise(self, spec):
        return self._noise

    def confirm(self, reference, candidate, example_inputs):
        self.confirmed += 1
        return {"faster": self.faster, "batches": {}}


def test_latency_mode_follows_a_planted_table():
    torch.manual_seed(3)
    x = torch.randn(2, 32, 8, 8)
    # Bottleneck: FLOPs reject the merge; a table that makes the merged 3x3 dense conv cheap
    # makes fold="latency" merge it.
    net = _linearised(Bottleneck(32, 8), x, ["relu1", "relu2"])
    cheap_merged = Table(lambda s: 1.0 if s.merged else 10.0)
    lat = _collapse(net, x, exact=False, fold="latency", measure_latency=False, cost=cheap_merged)
    assert len(_convs(lat.model)) == 1 and "compose_conv" in kinds(lat)
    assert lat.plan["metric"] == "cost" and lat.plan["predicted_total"] == 1.0
    assert lat.plan["unmerged_total"] == 30.0
    assert lat.plan["used"] == "latency" and lat.plan["confirm"]["faster"] and cheap_merged.confirmed == 1
    # Inverted residual: FLOPs accept the merge; a table that prices merged layers high keeps
    # the three layers apart.
    ir = _linearised(InvertedResidual(8), torch.randn(2, 8, 10, 10), ["act1", "act2"])
    dear_merged = Table(lambda s: 100.0 if s.merged else 1.0)
    kept = _collapse(ir, torch.randn(2, 8, 10, 10), exact=False, fold="latency", measure_latency=False,
                    cost=dear_merged)
    assert len(_convs(kept.model)) == 3 and "compose_conv" not in kinds(kept)
    assert any("chain plan" in e.get("reason", "") for e in kept.left)


def test_latency_mode_measures_on_device():
    torch.manual_seed(4)
    x = torch.randn(1, 8, 6, 6)
    net = _linearised(InvertedResidual(8), x, ["act1", "act2"])
    out = _collapse(net, x, exact=False, fold="latency", measure_latency=False)
    assert out.plan["metric"] == "ms" and out.plan["chains"]
    for c in out.plan["chains"]:  # the FLOPs plan unless the timed saving beats the noise
        if c["departed"]:
            assert c["predicted"] < c["reference"] - c["noise"] and c["noise"] >= 0
        else:
            assert c["segments"] == c["reference_segments"]
    with torch.no_grad():
        d = (net(x) - out.model(x)).abs()
    assert float(d[..., 1:-1, 1:-1].max()) < 1e-4 * float(net(x).abs().max())
