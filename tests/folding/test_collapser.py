"""Collapse and linearisation on small networks: each merge kind, the border trap, reports."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from _collapse_helpers import Branchy, Conv1D, GPT2MLPBlock, ViTBlock, force, remove_sites
from torch import nn

import egp_fast
from egp_fast.folding.collapser import collapse, depth_report
from egp_fast.folding.affine import ChannelAffine, linearize, site_affine
from egp_fast.folding.fold import compose_conv_weight
from egp_fast.errors import ConfigError
from egp_fast.graph import discover_sites, trace
from egp_fast.cli.models import BasicBlock, cifar_resnet18
from egp_fast.measurement.measure import measure_entropy


def _stats(model, x):
    return measure_entropy(model, [x], progress=False)


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) / max(float(a.abs().max()), 1e-12)


def _kinds(result):
    return [e["kind"] for e in result.removed]


# ---------------------------------------------------------------------------- site_affine


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


# ---------------------------------------------------------------------------- kernel composition


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
    st = _stats(net, x)
    out = collapse(net, st, x, fold="always", measure_latency=False, max_flip=1.0)
    assert "compose_conv" in _kinds(out) and out.exact
    assert out.after["longest_path"] == 1
    assert _rel(net(x), out.model(x)) < 1e-5


def test_compose_conv_weight_span():
    w1 = torch.randn(4, 3, 3, 3)
    w2 = torch.randn(5, 4, 3, 3)
    w = compose_conv_weight(w1, w2, (2, 2), (1, 1), (2, 2))
    assert w.shape == (5, 3, 11, 11)  # (3-1)*1 + (3-1)*2*2 + 1


# ---------------------------------------------------------------------------- small nets


def test_linear_linear_and_report():
    net = nn.Sequential(nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        net[0].bias += 100.0
    x = torch.randn(32, 7)
    out = collapse(net, _stats(net, x), x, measure_latency=False, max_flip=1.0)
    assert out.removed_sites == ["1"]
    assert "compose_linear" in _kinds(out)
    assert out.before["sites"] == 1 and out.after["sites"] == 0
    assert out.before["longest_path"] == 2 and out.after["longest_path"] == 1
    assert out.after["params"] == 7 * 3 + 3
    assert _rel(net(x), out.model(x)) < 1e-5
    assert "| nonlinear sites | 1 | 0 |" in out.table()
    d = out.to_dict()
    assert d["removed"][0]["site"] == "1" and d["exact"] is True


def test_input_model_not_modified():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    net.eval()
    with torch.no_grad():
        net[1].bias += 100.0
    x = torch.randn(2, 3, 6, 6)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    y = net(x).detach()
    collapse(net, _stats(net, x), x, measure_latency=False, max_flip=1.0)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert isinstance(net[2], nn.ReLU) and torch.equal(net(x), y)


def test_border_inexact_only_with_exact_false():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    net.eval()
    with torch.no_grad():
        net[1].bias += 100.0
    x = torch.randn(2, 3, 9, 9)
    st = _stats(net, x)
    ex = collapse(net, st, x, exact=True, fold="always", measure_latency=False, max_flip=1.0)
    assert "compose_conv" not in _kinds(ex)
    assert any("zero-padded" in e["reason"] for e in ex.left)
    assert ex.after["sites"] == 0 and ex.after["longest_path"] == 2
    assert _rel(net(x), ex.model(x)) < 1e-5
    approx = collapse(net, st, x, exact=False, fold="always", measure_latency=False, max_flip=1.0)
    merge = [e for e in approx.removed if e["kind"] == "compose_conv"]
    assert merge and merge[0]["exact"] is False and approx.exact is False
    assert approx.after["longest_path"] == 1
    dev = float((net(x) - approx.model(x)).abs().max())
    assert approx.max_deviation == pytest.approx(dev, rel=1e-4) and dev > 1e-3
    # Away from the border (1 px of each conv's padding) the composition is exact.
    inner = (net(x) - approx.model(x))[..., 2:-2, 2:-2]
    assert float(inner.abs().max()) < 1e-3


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("exact", [True, False])
def test_tiny_feature_maps_constant_branch_trap(size, exact):
    # conv1 pruned to 100%: the site sees the BN shift, a per-channel constant, some channels ON.
    # The next conv is zero-padded: its output depends on the position, not a per-channel bias.
    block = BasicBlock(4, 4)
    block.eval()
    with torch.no_grad():
        block.conv1.weight.zero_()
        block.bn1.bias.copy_(torch.tensor([1.5, -1.0, 0.7, -0.3]))
        block.bn2.running_var.fill_(1.0)
    x = torch.randn(3, 4, size, size)
    st = _stats(block, x)
    assert st.sites["relu1"].collapsible
    out = collapse(block, st, x, exact=exact, fold="always", measure_latency=False, max_flip=1.0)
    assert out.after["sites"] == 1
    if exact:
        assert _rel(block(x), out.model(x)) < 1e-5
        assert "dead_branch" not in _kinds(out)
    else:
        assert out.max_deviation == pytest.approx(float((block(x) - out.model(x)).abs().max()), rel=1e-4, abs=1e-6)


def test_dead_branch_all_off():
    block = BasicBlock(4, 4)
    block.eval()
    with torch.no_grad():
        block.bn1.bias.fill_(-100.0)
    x = torch.randn(3, 4, 4, 4)
    out = collapse(block, _stats(block, x), x, measure_latency=False, max_flip=1.0)
    assert "dead_branch" in _kinds(out)
    assert out.after["weight_layers"] == 0 and out.after["longest_path"] == 0
    assert _rel(block(x), out.model(x)) < 1e-5


def test_dead_channels_removed():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 5, 3, padding=1))
    net.eval()
    with torch.no_grad():
        net[1].bias.copy_(torch.tensor([100.0, -100.0] * 4))
    x = torch.randn(2, 3, 4, 4)
    out = collapse(net, _stats(net, x), x, exact=True, measure_latency=False, max_flip=1.0)
    dead = [e for e in out.removed if e["kind"] == "dead_channels"]
    assert dead and dead[0]["channels"] == 4
    assert out.after["params"] < out.before["params"]
    assert _rel(net(x), out.model(x)) < 1e-5


def test_fold_modes_cost_aware():
    # 3x3 64->64 then 1x1 64->256: the merged 3x3 64->256 costs more than the pair.
    net = nn.Sequential(nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Conv2d(64, 256, 1))
    with torch.no_grad():
        net[0].bias += 100.0
    x = torch.randn(1, 64, 6, 6)
    st = _stats(net, x)
    auto = collapse(net, st, x, fold="auto", measure_latency=False, max_flip=1.0)
    assert "compose_conv" not in _kinds(auto) and any("MFLOPs" in e["reason"] for e in auto.left)
    assert auto.after["sites"] == 0
    always = collapse(net, st, x, fold="always", measure_latency=False, max_flip=1.0)
    assert "compose_conv" in _kinds(always) and always.after["flops"] > always.before["flops"]
    never = collapse(net, st, x, fold="never", measure_latency=False, max_flip=1.0)
    assert "compose_conv" not in _kinds(never) and never.after["sites"] == 0
    assert any(e["reason"] == "fold='never'" for e in never.left)
    for r in (auto, always, never):
        assert _rel(net(x), r.model(x)) < 1e-5
    with pytest.raises(ConfigError):
        collapse(net, st, x, fold="sometimes")


def test_non_collapsible_site_untouched_and_sites_argument():
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        net[2].bias += 100.0
    x = torch.randn(64, 6)
    st = _stats(net, x)
    assert not st.sites["1"].collapsible and st.sites["3"].collapsible
    out = collapse(net, st, x, measure_latency=False, max_flip=1.0)
    assert out.removed_sites == ["3"] and out.after["sites"] == 1
    assert [s.name for s in discover_sites(out.model, x).sites] == ["1"]
    none = collapse(net, st, x, sites=["1"], measure_latency=False, max_flip=1.0)
    assert none.removed_sites == [] and none.after["sites"] == 2
    with pytest.raises(ConfigError):
        collapse(net, st, x, sites=["nope"])


def test_idempotent_residual_pickle_compile():
    torch.manual_seed(3)
    net = cifar_resnet18(10, width=8)
    net.eval()
    x = torch.randn(4, 3, 16, 16)
    force(net, x, [("layer1.0.relu1", 1), ("layer2.1.relu1", -1)])
    st = _stats(net, x)
    forced = ["layer1.0.relu1", "layer2.1.relu1"]
    out = collapse(net, st, x, exact=False, fold="always", measure_latency=False, max_flip=1.0, sites=forced)
    assert out.removed_sites == forced
    assert {"residual_identity", "dead_branch", "compose_conv"} <= set(_kinds(out))
    assert out.after["sites"] == 15 and out.after["longest_path"] < out.before["longest_path"]
    # Collapsing again with fresh statistics, or with the stale ones, changes nothing.
    y = out.model(x)
    fresh = _stats(out.model, x)
    again = collapse(out.model, fresh, x, exact=False, measure_latency=False, max_flip=1.0,
                     sites=[n for n in fresh.sites if n in forced])
    stale = collapse(out.model, st, x, exact=False, measure_latency=False, max_flip=1.0, sites=forced)
    for r in (again, stale):
        assert r.removed_sites == [] and r.after["sites"] == 15
        assert r.after["longest_path"] == out.after["longest_path"]
        assert _rel(y, r.model(x)) < 1e-5
    buf = io.BytesIO()
    torch.save(out.model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.allclose(loaded(x), y, atol=1e-5)
    compiled = torch.compile(out.model, backend="aot_eager")
    assert torch.allclose(compiled(x), y, atol=1e-4)


def test_untraceable_model_left_in_place_with_reason():
    net = Branchy()
    with torch.no_grad():
        net.fc1.bias += 100.0
    x = torch.randn(16, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st = _stats(net, x)
        out = collapse(net, st, x, measure_latency=False, max_flip=1.0)
    assert out.removed_sites == ["act"]
    assert any("nothing folded" in e["reason"] for e in out.left)
    assert _rel(net(x), out.model(x)) < 1e-6


def test_depth_report_latency_keys():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    rep = depth_report(net, torch.randn(3, 4), measure_latency=True)
    assert rep["sites"] == 1 and rep["longest_path"] == 2 and rep["params"] == 58
    assert rep["flops"] == 2 * 3 * (4 * 8 + 8 * 2)
    assert rep["latency_ms_b1"] > 0 and rep["latency_ms_b64"] > 0


# ---------------------------------------------------------------------------- linearize in place


def test_linearize_module_called_twice():
    import torchvision

    net = torchvision.models.resnet18(num_classes=4)
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        net.layer1[0].bn1.bias += 100.0
    st = _stats(net, x)
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
    st = _stats(net, x)
    assert set(st.zero_entropy_sites()) == {"body.1", "relu"}
    y = net(x).detach()
    with pytest.warns(UserWarning, match="root module"):
        done = linearize(net, st)
    assert done == ["body.1"] and isinstance(net.body[1], ChannelAffine)
    gm = trace(net)
    st2 = _stats(gm, x)
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
        linearize(net, _stats(net, torch.randn(4, 4)), sites=["missing"])


def test_public_exports():
    assert egp_fast.collapse is collapse and egp_fast.linearize is linearize
    assert egp_fast.CollapseResult.__name__ == "CollapseResult"


# ---------------------------------------------------------------------------- EASIER: removed sites fold


def test_vit_block_identity_gelu_folds_mlp_into_one_linear_exactly():
    torch.manual_seed(0)
    net = nn.Sequential(ViTBlock(), ViTBlock(), nn.Linear(32, 4))
    x = torch.randn(4, 17, 32)
    st = _stats(net, x)
    remove_sites(net, st, ["0.act", "1.act"])
    y = net(x).detach()
    out = collapse(net, st, x, measure_latency=False, sites=[])  # fold="auto", exact=True
    assert _kinds(out).count("compose_linear") == 2 and out.exact
    lin = [e for e in out.removed if e["kind"] == "linearize"]
    assert [e["site"] for e in lin] == ["0.act", "1.act"]
    assert all(e["how"] == "identity" and e["linearization_exact"] is False and e["composed"] for e in lin)
    assert _rel(y, out.model(x)) <= 1e-4 and out.relative_deviation <= 1e-4
    # Each MLP (32 -> 128 -> 32) is now one 32 -> 32 linear: FLOPs and depth fall.
    assert out.after["longest_path"] == out.before["longest_path"] - 2
    assert out.after["flops"] < out.before["flops"] / 4
    mods = dict(out.model.named_modules())
    assert not any(isinstance(m, nn.GELU) for m in mods.values())


def test_gpt2_conv1d_mlp_folds_like_linear():
    torch.manual_seed(0)
    block = GPT2MLPBlock()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        block.c_fc.bias += 100.0  # every GELU unit far in its linear piece
    st = _stats(block, x)
    assert st.zero_entropy_sites() == ["act"]
    out = collapse(block, st, x, measure_latency=False, max_flip=1.0)
    assert out.removed_sites == ["act"] and "compose_linear" in _kinds(out)
    assert _rel(block(x), out.model(x)) <= 1e-4
    linears = [m for m in out.model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].weight.shape == (16, 16)
    assert not any(isinstance(m, Conv1D) for m in out.model.modules())
    # Identity linearisation (EASIER) of the same block folds the same way, exactly.
    plain = GPT2MLPBlock()
    st = _stats(plain, x)
    remove_sites(plain, st, ["act"])
    folded = collapse(plain, st, x, measure_latency=False, sites=[])
    assert "compose_linear" in _kinds(folded) and folded.exact
    assert _rel(plain(x), folded.model(x)) <= 1e-4


def test_majority_linearisation_drops_dead_channels():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    x = torch.randn(64, 6)
    with torch.no_grad():
        net[0].bias[:6] -= 3.0  # half the units mostly OFF
    st = _stats(net, x)
    remove_sites(net, st, ["1"], how="majority")
    y = net(x).detach()
    out = collapse(net, st, x, measure_latency=False, sites=[], fold="never")
    assert "dead_channels" in _kinds(out) and out.after["params"] < out.before["params"]
    assert _rel(y, out.model(x)) <= 1e-5
    assert collapse(net, st, x, measure_latency=False, sites=[]).after["longest_path"] == 1


def test_conv1d_lookalike_with_other_semantics_is_not_converted():
    class Conv1D(nn.Module):  # same name, weight used as [out, in]: not transformers' layer
        def __init__(self):
            super().__init__()
            self.nf = 4
            self.weight = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return x @ self.weight.t()

    from egp_fast.folding.collapser import _is_conv1d

    assert not _is_conv1d(Conv1D())
    assert _is_conv1d(GPT2MLPBlock().c_fc)


def test_untraceable_conv1d_model_swaps_sites_and_says_why():
    class Gpt(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = GPT2MLPBlock()

        def forward(self, x):
            if x.sum() > 1e9:  # data-dependent control flow: fx cannot trace it
                return x
            return self.block(x)

    net = Gpt()
    with torch.no_grad():
        net.block.c_fc.bias += 100.0
    x = torch.randn(2, 5, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st = _stats(net, x)
        out = collapse(net, st, x, measure_latency=False, max_flip=1.0)
    assert out.removed_sites == ["block.act"]
    assert any("nothing folded" in e["reason"] for e in out.left)
    assert _rel(net(x), out.model(x)) <= 1e-4


def test_cifar_block_both_relus_identity():
    torch.manual_seed(0)
    block = BasicBlock(8, 8).eval()
    x = torch.randn(2, 8, 6, 6)
    st = _stats(block, x)
    remove_sites(block, st, ["relu1", "relu2"])
    y = block(x).detach()
    ex = collapse(block, st, x, measure_latency=False, sites=[], exact=True, fold="always")
    assert ex.exact and "compose_conv" not in _kinds(ex) and _rel(y, ex.model(x)) <= 1e-5
    assert not any(e["composed"] for e in ex.removed if e["kind"] == "linearize")
    assert any("zero-padded" in e["reason"] for e in ex.left)
    approx = collapse(block, st, x, measure_latency=False, sites=[], exact=False, fold="always")
    # conv2 . conv1 -> one 5x5 conv, and the identity shortcut embedded in it: one layer left.
    assert {"compose_conv", "residual_identity"} <= set(_kinds(approx))
    # relu1 sat between the two convs; relu2 (after the add) has no layer after it in this block.
    assert [e["composed"] for e in approx.removed if e["kind"] == "linearize"] == [True, False]
    assert approx.after["weight_layers"] == 1 and not approx.exact
    dev = (y - approx.model(x)).abs()
    assert approx.max_deviation == pytest.approx(float(dev.max()), rel=1e-4)
    assert float(dev[..., 2:-2, 2:-2].max()) <= 1e-4 * float(y.abs().max())  # exact off the border
