"""The two-layer merges on small networks: composition across a removed site (and the border
trap), the cost-aware fold modes, residual shortcuts and dead channels, including what EASIER's
removed sites fold to."""

from __future__ import annotations

import io

import pytest
import torch
from _collapse_helpers import Conv1D, GPT2MLPBlock, ViTBlock, force, kinds, rel, remove_sites, stats_of
from torch import nn

from egp_fast.errors import ConfigError
from egp_fast.cli.models import BasicBlock, cifar_resnet18
from egp_fast.folding import collapse


def test_border_inexact_only_with_exact_false():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    net.eval()
    with torch.no_grad():
        net[1].bias += 100.0
    x = torch.randn(2, 3, 9, 9)
    st = stats_of(net, x)
    ex = collapse(net, st, x, exact=True, fold="always", measure_latency=False, max_flip=1.0)
    assert "compose_conv" not in kinds(ex)
    assert any("zero-padded" in e["reason"] for e in ex.left)
    assert ex.after["sites"] == 0 and ex.after["longest_path"] == 2
    assert rel(net(x), ex.model(x)) < 1e-5
    approx = collapse(net, st, x, exact=False, fold="always", measure_latency=False, max_flip=1.0)
    merge = [e for e in approx.removed if e["kind"] == "compose_conv"]
    assert merge and merge[0]["exact"] is False and approx.exact is False
    assert approx.after["longest_path"] == 1
    dev = float((net(x) - approx.model(x)).abs().max())
    assert approx.max_deviation == pytest.approx(dev, rel=1e-4) and dev > 1e-3
    # Away from the border (1 px of each conv's padding) the composition is exact.
    inner = (net(x) - approx.model(x))[..., 2:-2, 2:-2]
    assert float(inner.abs().max()) < 1e-3


def test_fold_modes_cost_aware():
    # 3x3 64->64 then 1x1 64->256: the merged 3x3 64->256 costs more than the pair.
    net = nn.Sequential(nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Conv2d(64, 256, 1))
    with torch.no_grad():
        net[0].bias += 100.0
    x = torch.randn(1, 64, 6, 6)
    st = stats_of(net, x)
    auto = collapse(net, st, x, fold="auto", measure_latency=False, max_flip=1.0)
    assert "compose_conv" not in kinds(auto) and any("MFLOPs" in e["reason"] for e in auto.left)
    assert auto.after["sites"] == 0
    always = collapse(net, st, x, fold="always", measure_latency=False, max_flip=1.0)
    assert "compose_conv" in kinds(always) and always.after["flops"] > always.before["flops"]
    never = collapse(net, st, x, fold="never", measure_latency=False, max_flip=1.0)
    assert "compose_conv" not in kinds(never) and never.after["sites"] == 0
    assert any(e["reason"] == "fold='never'" for e in never.left)
    for r in (auto, always, never):
        assert rel(net(x), r.model(x)) < 1e-5
    with pytest.raises(ConfigError):
        collapse(net, st, x, fold="sometimes")


def test_dead_channels_removed():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 5, 3, padding=1))
    net.eval()
    with torch.no_grad():
        net[1].bias.copy_(torch.tensor([100.0, -100.0] * 4))
    x = torch.randn(2, 3, 4, 4)
    out = collapse(net, stats_of(net, x), x, exact=True, measure_latency=False, max_flip=1.0)
    dead = [e for e in out.removed if e["kind"] == "dead_channels"]
    assert dead and dead[0]["channels"] == 4
    assert out.after["params"] < out.before["params"]
    assert rel(net(x), out.model(x)) < 1e-5


def test_majority_linearisation_drops_dead_channels():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    x = torch.randn(64, 6)
    with torch.no_grad():
        net[0].bias[:6] -= 3.0  # half the units mostly OFF
    st = stats_of(net, x)
    remove_sites(net, st, ["1"], how="majority")
    y = net(x).detach()
    out = collapse(net, st, x, measure_latency=False, sites=[], fold="never")
    assert "dead_channels" in kinds(out) and out.after["params"] < out.before["params"]
    assert rel(y, out.model(x)) <= 1e-5
    assert collapse(net, st, x, measure_latency=False, sites=[]).after["longest_path"] == 1


def test_idempotent_residual_pickle_compile():
    torch.manual_seed(3)
    net = cifar_resnet18(10, width=8)
    net.eval()
    x = torch.randn(4, 3, 16, 16)
    force(net, x, [("layer1.0.relu1", 1), ("layer2.1.relu1", -1)])
    st = stats_of(net, x)
    forced = ["layer1.0.relu1", "layer2.1.relu1"]
    out = collapse(net, st, x, exact=False, fold="always", measure_latency=False, max_flip=1.0, sites=forced)
    assert out.removed_sites == forced
    assert {"residual_identity", "dead_branch", "compose_conv"} <= set(kinds(out))
    assert out.after["sites"] == 15 and out.after["longest_path"] < out.before["longest_path"]
    # Collapsing again with fresh statistics, or with the stale ones, changes nothing.
    y = out.model(x)
    fresh = stats_of(out.model, x)
    again = collapse(out.model, fresh, x, exact=False, measure_latency=False, max_flip=1.0,
                     sites=[n for n in fresh.sites if n in forced])
    stale = collapse(out.model, st, x, exact=False, measure_latency=False, max_flip=1.0, sites=forced)
    for r in (again, stale):
        assert r.removed_sites == [] and r.after["sites"] == 15
        assert r.after["longest_path"] == out.after["longest_path"]
        assert rel(y, r.model(x)) < 1e-5
    buf = io.BytesIO()
    torch.save(out.model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.allclose(loaded(x), y, atol=1e-5)
    compiled = torch.compile(out.model, backend="aot_eager")
    assert torch.allclose(compiled(x), y, atol=1e-4)


def test_vit_block_identity_gelu_folds_mlp_into_one_linear_exactly():
    torch.manual_seed(0)
    net = nn.Sequential(ViTBlock(), ViTBlock(), nn.Linear(32, 4))
    x = torch.randn(4, 17, 32)
    st = stats_of(net, x)
    remove_sites(net, st, ["0.act", "1.act"])
    y = net(x).detach()
    out = collapse(net, st, x, measure_latency=False, sites=[])  # fold="auto", exact=True
    assert kinds(out).count("compose_linear") == 2 and out.exact
    lin = [e for e in out.removed if e["kind"] == "linearize"]
    assert [e["site"] for e in lin] == ["0.act", "1.act"]
    assert all(e["how"] == "identity" and e["linearization_exact"] is False and e["composed"] for e in lin)
    assert rel(y, out.model(x)) <= 1e-4 and out.relative_deviation <= 1e-4
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
    st = stats_of(block, x)
    assert st.zero_entropy_sites() == ["act"]
    out = collapse(block, st, x, measure_latency=False, max_flip=1.0)
    assert out.removed_sites == ["act"] and "compose_linear" in kinds(out)
    assert rel(block(x), out.model(x)) <= 1e-4
    linears = [m for m in out.model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].weight.shape == (16, 16)
    assert not any(isinstance(m, Conv1D) for m in out.model.modules())
    # Identity linearisation (EASIER) of the same block folds the same way, exactly.
    plain = GPT2MLPBlock()
    st = stats_of(plain, x)
    remove_sites(plain, st, ["act"])
    folded = collapse(plain, st, x, measure_latency=False, sites=[])
    assert "compose_linear" in kinds(folded) and folded.exact
    assert rel(plain(x), folded.model(x)) <= 1e-4


def test_cifar_block_both_relus_identity():
    torch.manual_seed(0)
    block = BasicBlock(8, 8).eval()
    x = torch.randn(2, 8, 6, 6)
    st = stats_of(block, x)
    remove_sites(block, st, ["relu1", "relu2"])
    y = block(x).detach()
    ex = collapse(block, st, x, measure_latency=False, sites=[], exact=True, fold="always")
    assert ex.exact and "compose_conv" not in kinds(ex) and rel(y, ex.model(x)) <= 1e-5
    assert not any(e["composed"] for e in ex.removed if e["kind"] == "linearize")
    assert any("zero-padded" in e["reason"] for e in ex.left)
    approx = collapse(block, st, x, measure_latency=False, sites=[], exact=False, fold="always")
    # conv2 . conv1 -> one 5x5 conv, and the identity shortcut embedded in it: one layer left.
    assert {"compose_conv", "residual_identity"} <= set(kinds(approx))
    # relu1 sat between the two convs; relu2 (after the add) has no layer after it in this block.
    assert [e["composed"] for e in approx.removed if e["kind"] == "linearize"] == [True, False]
    assert approx.after["weight_layers"] == 1 and not approx.exact
    dev = (y - approx.model(x)).abs()
    assert approx.max_deviation == pytest.approx(float(dev.max()), rel=1e-4)
    assert float(dev[..., 2:-2, 2:-2].max()) <= 1e-4 * float(y.abs().max())  # exact off the border
