"""linearize in place: the data map, EASIER's identity and the per-channel majority.

Each test builds the expected output by hand (the activation replaced by the map it should
become) and compares with the rewritten model, on module sites, a module called twice
(torchvision's BasicBlock) and functional calls; then the stale-statistics and argument checks.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _collapse_helpers import stats_of
from _models import FunctionalMLP
from torchvision.models.resnet import BasicBlock

import egp_fast
from egp_fast.folding import ChannelAffine, collapse, linearize, linearize_sites
from egp_fast.errors import ConfigError
from egp_fast.graph import discover_sites, trace


def _mlp(bias0=None):
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    if bias0 is not None:
        with torch.no_grad():
            net[0].weight.zero_()
            net[0].weight[:, 0] = 1.0  # z_c = x_0 + b_c: the bias sets how often channel c is ON
            net[0].bias.copy_(torch.tensor(bias0))
    return net


def _measure(net, x):
    return egp_fast.measure_entropy(net, [x], progress=False)


def test_identity_replaces_a_live_site_by_y_equals_z_and_is_marked_approximate():
    net = _mlp([0.0, 1.0, -1.0, 0.5, 2.0, 0.0])
    x = torch.randn(256, 4)
    stats = _measure(net, x)
    assert stats.sites["1"].entropy > 0
    expect = net[2](net[0](x))  # the ReLU gone
    assert egp_fast.linearize(net, stats, sites=["1"], how="identity") == ["1"]
    aff = net[1]
    assert isinstance(aff, ChannelAffine) and aff.is_identity()
    assert aff.exact is False and aff.how == "identity" and aff.site == "1"
    assert torch.allclose(net(x), expect, atol=1e-6)


def test_majority_keeps_mostly_on_channels_and_zeroes_mostly_off_ones():
    # p_on per channel: ~0.5+, ~0.84, ~0.16, ~0.69, ~0.98, ~0.02 (x_0 ~ N(0, 1))
    bias = [0.05, 1.0, -1.0, 0.5, 2.0, -2.0]
    net = _mlp(bias)
    x = torch.randn(4096, 4)
    stats = _measure(net, x)
    p_on = stats.sites["1"].p_on
    on = (p_on >= 0.5).to(torch.float32)
    assert on.tolist() == [1, 1, 0, 1, 1, 0]
    expect = net[2](net[0](x) * on)
    egp_fast.linearize(net, stats, sites=["1"], how="majority")
    assert torch.equal(net[1].scale, on) and torch.equal(net[1].shift, torch.zeros(6))
    assert net[1].exact is False
    assert torch.allclose(net(x), expect, atol=1e-6)


def test_data_on_a_zero_entropy_site_is_exact_and_ignores_live_sites():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        net[2].bias.fill_(100.0)  # site "3": every channel always ON
    x = torch.randn(64, 4)
    stats = _measure(net, x)
    assert stats.sites["3"].collapsible and not stats.sites["1"].collapsible
    before = net(x)
    # how="data" with a live site named: that site is left alone
    assert egp_fast.linearize(net, stats, sites=["1", "3"], how="data") == ["3"]
    assert isinstance(net[3], ChannelAffine) and net[3].exact is True and net[3].how == "data"
    assert isinstance(net[1], nn.ReLU)
    assert torch.allclose(net(x), before, atol=1e-5)


def test_identity_on_an_all_on_site_is_still_exact():
    net = _mlp([50.0] * 6)
    x = torch.randn(64, 4)
    stats = _measure(net, x)
    egp_fast.linearize(net, stats, sites=["1"], how="identity")
    assert net[1].exact is True  # the identity *is* the data map here


def test_gelu_identity_is_never_exact():
    net = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 2))
    with torch.no_grad():
        net[0].bias.fill_(50.0)
    x = torch.randn(32, 4)
    stats = _measure(net, x)
    egp_fast.linearize(net, stats, sites=["1"], how="identity")
    assert net[1].exact is False


def test_relu6_majority_uses_the_most_frequent_piece():
    net = nn.Sequential(nn.Linear(1, 3), nn.ReLU6(), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.copy_(torch.tensor([7.0, 3.0, -1.0]))  # mostly: saturated, middle, below zero
    x = torch.randn(2048, 1)  # N(0, 1): each channel leaves its main piece now and then
    stats = _measure(net, x)
    st = stats.sites["1"]
    assert not st.collapsible
    egp_fast.linearize(net, stats, sites=["1"], how="majority")
    aff = net[1]
    assert aff.scale.tolist() == [0.0, 1.0, 0.0] and aff.shift.tolist() == [6.0, 0.0, 0.0]
    z = net[0](x)
    expect = net[2](torch.stack([torch.full_like(z[:, 0], 6.0), z[:, 1], torch.zeros_like(z[:, 2])], 1))
    assert torch.allclose(net(x), expect, atol=1e-5)


def test_leaky_relu_majority_off_channels_keep_the_slope():
    net = nn.Sequential(nn.Linear(1, 2), nn.LeakyReLU(0.2), nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.copy_(torch.tensor([1.0, -1.0]))
    x = torch.randn(1024, 1)
    stats = _measure(net, x)
    egp_fast.linearize(net, stats, sites=["1"], how="majority")
    assert net[1].scale.tolist() == pytest.approx([1.0, 0.2])


class _Net(nn.Module):
    """A conv stem and one torchvision BasicBlock (its ``relu`` is called twice)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = BasicBlock(4, 4)

    def forward(self, x):
        return self.block(self.stem(x))


def _block_by_hand(b, x, first, second):
    out = first(b.bn1(b.conv1(x)))
    out = b.bn2(b.conv2(out)) + x
    return second(out)


@pytest.mark.parametrize("which", ["block.relu", "block.relu:1"])
def test_one_call_of_a_module_called_twice(which):
    net = _Net().eval()
    x = torch.randn(8, 3, 6, 6)
    stats = _measure(net, x)
    assert list(stats.sites) == ["block.relu", "block.relu:1"]
    b = net.block
    relu = nn.ReLU()
    first, second = (nn.Identity(), relu) if which == "block.relu" else (relu, nn.Identity())
    with torch.no_grad():
        expect = _block_by_hand(b, net.stem(x), first, second)
    assert egp_fast.linearize(net, stats, sites=[which], how="identity") == [which]
    assert isinstance(net.block, torch.fx.GraphModule)  # the caller was rewritten
    with torch.no_grad():
        assert torch.allclose(net(x), expect, atol=1e-5)
    # the other call is still a site, under its alias name; the removed one is gone
    left = list(_measure(net, x).sites)
    assert len(left) == 1 and which not in left and left[0].startswith("block.relu_call")


def test_both_calls_at_once_with_different_ways():
    net = _Net().eval()
    x = torch.randn(8, 3, 6, 6)
    stats = _measure(net, x)
    on = (stats.sites["block.relu:1"].p_on >= 0.5).to(torch.float32).view(1, -1, 1, 1)
    b = net.block
    with torch.no_grad():
        expect = _block_by_hand(b, net.stem(x), nn.Identity(), lambda t: t * on)
    done, refused = linearize_sites(net, stats, ["block.relu", "block.relu:1"],
                               {"block.relu": "identity", "block.relu:1": "majority"})
    assert done == ["block.relu", "block.relu:1"] and not refused
    with torch.no_grad():
        assert torch.allclose(net(x), expect, atol=1e-5)


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = FunctionalMLP()

    def forward(self, x):
        return self.body(x)


def test_functional_site_in_a_submodule():
    net = _Outer()
    x = torch.randn(64, 4)
    stats = _measure(net, x)
    (name,) = stats.sites
    expect = net.body.fc2(net.body.fc1(x))
    assert egp_fast.linearize(net, stats, sites=[name], how="identity") == [name]
    assert torch.allclose(net(x), expect, atol=1e-6)
    # parameters are the same objects: an optimizer built before still trains the model
    assert net.body.fc1.weight is dict(net.named_parameters())["body.fc1.weight"]


def test_functional_site_in_a_root_graph_module():
    gm = egp_fast.trace(FunctionalMLP())
    x = torch.randn(64, 4)
    stats = _measure(gm, x)
    (name,) = stats.sites
    expect = gm.fc2(gm.fc1(x))
    assert egp_fast.linearize(gm, stats, sites=[name], how="majority") == [name]
    on = (stats.sites[name].p_on >= 0.5).to(torch.float32)
    expect = gm.fc2(gm.fc1(x) * on)
    assert torch.allclose(gm(x), expect, atol=1e-6)


def test_bad_how_and_missing_sites_are_config_errors():
    net = _mlp()
    stats = _measure(net, torch.randn(8, 4))
    with pytest.raises(ConfigError, match="how='linear'"):
        egp_fast.linearize(net, stats, sites=["1"], how="linear")
    with pytest.raises(ConfigError, match="sites="):
        egp_fast.linearize(net, stats, how="identity")
    with pytest.raises(ConfigError, match="does not have|stats does"):
        egp_fast.linearize(net, stats, sites=["nope"], how="identity")
    assert isinstance(net[1], nn.ReLU)


def test_collapse_folds_an_identity_site_and_reports_it_as_approximate():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(64, 4)
    stats = _measure(net, x)
    egp_fast.linearize(net, stats, sites=["3"], how="identity")
    out = egp_fast.collapse(net, _measure(net, x), x[:2], measure_latency=False)
    assert out.after["sites"] == 1  # site "1" is still live
    assert torch.allclose(out.model(x), net(x), atol=1e-5)
    (entry,) = [e for e in out.removed if e.get("kind") == "linearize" and e.get("site") == "3"]
    # folding the map now in the model is exact; the linearisation itself was an approximation
    assert entry["linearization_exact"] is False and entry["how"] == "identity"


def test_linearize_module_called_twice():
    import torchvision

    net = torchvision.models.resnet18(num_classes=4)
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        net.layer1[0].bn1.bias += 100.0
    st = stats_of(net, x)
    assert "layer1.0.relu" in st.zero_entropy_sites() and "layer1.0.relu:1" not in st.zero_entropy_sites()
    y = net(x).detach()
    params = {id(p) for p in net.parameters()}
    done = linearize(net, st, sites=["layer1.0.relu"])
    assert done == ["layer1.0.relu"]
    assert torch.allclose(net(x), y, rtol=1e-5, atol=1e-4)
    assert {id(p) for p in net.parameters()} == params  # the optimizer's tensors stay valid
    names = [s.name for s in discover_sites(net, x).sites]
    assert len(names) == 16 and "layer1.0.relu_call1" in names and "layer1.0.relu" not in names
    # Stale statistics cannot hit the remaining call.
    with pytest.warns(UserWarning, match="stale"):
        assert linearize(net, st, sites=["layer1.0.relu"]) == []
    assert len(discover_sites(net, x).sites) == 16


def test_linearize_single_module_and_functional():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
            self.fc = nn.Linear(8, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(F.relu(self.fc(self.body(x))))

    net = Net()
    with torch.no_grad():
        net.body[0].bias += 100.0
        net.fc.bias -= 100.0
    x = torch.randn(16, 4)
    st = stats_of(net, x)
    assert set(st.zero_entropy_sites()) == {"body.1", "relu"}
    y = net(x).detach()
    with pytest.warns(UserWarning, match="root module"):
        done = linearize(net, st)
    assert done == ["body.1"] and isinstance(net.body[1], ChannelAffine)
    gm = trace(net)
    st2 = stats_of(gm, x)
    assert linearize(gm, st2) == ["relu"]
    assert torch.allclose(gm(x), y, atol=1e-5)
    # collapse folds the earlier linearisations too.
    out = collapse(gm, st2, x, measure_latency=False, max_flip=1.0)
    assert out.after["sites"] == 0 and torch.allclose(out.model(x), y, atol=1e-4)


def test_linearize_stats_validation():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    with pytest.raises(ConfigError):
        linearize(net, {"not": "stats"})
    with pytest.raises(ConfigError):
        linearize(net, stats_of(net, torch.randn(4, 4)), sites=["missing"])


class _SharedModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class _SharedDepth(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.block, self.out = nn.Linear(8, 16), _SharedModule(), nn.Linear(16, 3)

    def forward(self, x):
        x = self.inp(x)
        for _ in range(2):
            x = self.block(x)
        return self.out(x)


def test_a_site_in_a_block_shared_across_depth_is_unremovable_and_easier_skips_it():
    import warnings

    from egp_fast.folding.linearizer import unremovable_sites

    torch.manual_seed(0)
    net = _SharedDepth().eval()
    x = torch.randn(32, 8)
    want = net(x)
    stats = egp_fast.measure_entropy(net, [x], progress=False)
    assert list(stats.sites) == ["block.act", "block.act:1"]
    why = unremovable_sites(net, ["block.act", "block.act:1"])
    assert set(why) == {"block.act", "block.act:1"} and all("shared across depth" in w for w in why.values())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert linearize(net, stats, sites=["block.act"], how="identity") == []
    assert any("shared across depth" in str(w.message) for w in caught)
    torch.testing.assert_close(net(x), want)  # untouched
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = egp_fast.prune(net, [x], method="easier", iterations=1, evaluate=lambda m: 1.0, progress=False)
    assert res.removed_sites == []


class _OptionalShortcut(nn.Module):
    """One ReLU module used twice, in a forward with an optional input (timm's DlaBasic)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.relu = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()

    def forward(self, x, shortcut=None):
        if shortcut is None:
            shortcut = x
        return self.relu(self.c2(self.relu(self.c1(x))) + shortcut)


class _CallsOptional(nn.Module):
    def __init__(self, pass_shortcut):
        super().__init__()
        self.stem, self.block, self.pass_shortcut = nn.Conv2d(3, 4, 3, padding=1), _OptionalShortcut(), pass_shortcut

    def forward(self, x):
        x = self.stem(x)
        return self.block(x, x * 2) if self.pass_shortcut else self.block(x)


@pytest.mark.parametrize("pass_shortcut", [False, True])
def test_rewriting_a_caller_keeps_its_optional_inputs_as_the_call_uses_them(pass_shortcut):
    torch.manual_seed(0)
    net = _CallsOptional(pass_shortcut).eval()
    x = torch.randn(2, 3, 8, 8)
    stats = egp_fast.measure_entropy(net, [x], progress=False)
    assert linearize(net, stats, sites=["block.relu:1"], how="identity") == ["block.relu:1"]
    b = net.block  # now a GraphModule of the block: the second ReLU call is the identity
    with torch.no_grad():
        s = net.stem(x)
        want = b.c2(torch.relu(b.c1(s))) + (s * 2 if pass_shortcut else s)
        torch.testing.assert_close(net(x), want)
