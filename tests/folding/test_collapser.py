"""collapse() on small networks: what it reports, what it leaves alone, models fx cannot trace,
and how it turns transformers' Conv1D into nn.Linear."""

from __future__ import annotations

import warnings

import pytest
import torch
from _collapse_helpers import Branchy, GPT2MLPBlock, kinds, rel, stats_of
from torch import nn
import torch.nn.functional as F

import egp_fast
from egp_fast.errors import ConfigError
from egp_fast.folding import collapse, linearize
from egp_fast.graph import discover_sites


def test_linear_linear_and_report():
    net = nn.Sequential(nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        net[0].bias += 100.0
    x = torch.randn(32, 7)
    out = collapse(net, stats_of(net, x), x, measure_latency=False, max_flip=1.0)
    assert out.removed_sites == ["1"]
    assert "compose_linear" in kinds(out)
    assert out.before["sites"] == 1 and out.after["sites"] == 0
    assert out.before["longest_path"] == 2 and out.after["longest_path"] == 1
    assert out.after["params"] == 7 * 3 + 3
    assert rel(net(x), out.model(x)) < 1e-5
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
    collapse(net, stats_of(net, x), x, measure_latency=False, max_flip=1.0)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert isinstance(net[2], nn.ReLU) and torch.equal(net(x), y)


def test_non_collapsible_site_untouched_and_sites_argument():
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        net[2].bias += 100.0
    x = torch.randn(64, 6)
    st = stats_of(net, x)
    assert not st.sites["1"].collapsible and st.sites["3"].collapsible
    out = collapse(net, st, x, measure_latency=False, max_flip=1.0)
    assert out.removed_sites == ["3"] and out.after["sites"] == 1
    assert [s.name for s in discover_sites(out.model, x).sites] == ["1"]
    none = collapse(net, st, x, sites=["1"], measure_latency=False, max_flip=1.0)
    assert none.removed_sites == [] and none.after["sites"] == 2
    with pytest.raises(ConfigError):
        collapse(net, st, x, sites=["nope"])


def test_untraceable_model_left_in_place_with_reason():
    net = Branchy()
    with torch.no_grad():
        net.fc1.bias += 100.0
    x = torch.randn(16, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st = stats_of(net, x)
        out = collapse(net, st, x, measure_latency=False, max_flip=1.0)
    assert out.removed_sites == ["act"]
    assert any("nothing folded" in e["reason"] for e in out.left)
    assert rel(net(x), out.model(x)) < 1e-6


# ---------------------------------------------------------------------------- exports


def test_public_exports():
    assert egp_fast.collapse is collapse and egp_fast.linearize is linearize
    assert egp_fast.CollapseResult.__name__ == "CollapseResult"


# ---------------------------------------------------------------------------- transformers' Conv1D


def test_conv1d_lookalike_with_other_semantics_is_not_converted():
    class Conv1D(nn.Module):  # same name, weight used as [out, in]: not transformers' layer
        def __init__(self):
            super().__init__()
            self.nf = 4
            self.weight = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return x @ self.weight.t()

    from egp_fast.folding.plain import _is_conv1d

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
        st = stats_of(net, x)
        out = collapse(net, st, x, measure_latency=False, max_flip=1.0)
    assert out.removed_sites == ["block.act"]
    assert any("nothing folded" in e["reason"] for e in out.left)
    assert rel(net(x), out.model(x)) <= 1e-4




class _Untraceable(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent control flow: fx cannot trace it (module hooks measure)
            return x
        return self.body(x)


@pytest.mark.parametrize("traced", [True, False])
@pytest.mark.parametrize("act", [nn.GELU(), nn.SiLU(inplace=True)])
def test_exact_collapse_removes_a_smooth_site_only_where_it_is_affine_to_rounding(act, traced):
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(8, 16), act, nn.Linear(16, 4))
    net = (body if traced else _Untraceable(body)).eval()
    name = "1" if traced else "body.1"
    data = [torch.randn(512, 8) for _ in range(2)]
    for bias, removed in [(0.5, False), (40.0, True)]:
        with torch.no_grad():
            body[0].weight.copy_(torch.randn(16, 8) * 0.01)
            body[0].bias.fill_(bias)  # always positive: zero entropy, yet curved near 0.5
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fx fallback warning
            st = egp_fast.measure_entropy(net, data, progress=False)
            assert st.zero_entropy_sites() == [name]
            out = collapse(net, st, data[0], measure_latency=False)  # exact=True, the default
            approx = collapse(net, st, data[0], exact=False, measure_latency=False)
        assert approx.removed_sites == [name] and not approx.exact  # exact=False always removes it
        if removed:  # 40 is far in the linear tail: the identity to float32 rounding
            assert out.removed_sites == [name]
            assert out.relative_deviation <= 1e-6
            assert out.exact and all(e["exact"] for e in out.removed)  # checked, so reported exact
            continue
        assert out.removed_sites == [] and out.exact and out.relative_deviation <= 1e-6
        (entry,) = [e for e in out.left if e.get("kind") == "approximate"]
        assert entry["site"] == name and "exact=False" in entry["reason"] and entry["gap"] > 0.05
        assert approx.relative_deviation > 0.05  # what exact=True refused to do, measured


def test_an_untraceable_model_reports_the_sites_linearised_earlier():
    torch.manual_seed(0)
    net = _Untraceable(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))).eval()
    data = [torch.randn(16, 4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fx fallback warning
        st = egp_fast.measure_entropy(net, data, progress=False)
        linearize(net, st, sites=["body.1"], how="identity")
        out = collapse(net, egp_fast.measure_entropy(net, data, progress=False), data[0], measure_latency=False)
    assert out.removed_sites == ["body.1"]  # as the traced path reports it
    (entry,) = out.removed
    assert entry["how"] == "identity" and "earlier" in entry["note"]
    assert any("nothing folded" in e["reason"] for e in out.left)


class _NormAct(nn.Module):
    """A batch norm written with F.batch_norm behind a rank check, as timm's BatchNormAct2d."""

    def __init__(self, c, affine=True):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c) + 0.5) if affine else None
        self.bias = nn.Parameter(torch.randn(c)) if affine else None
        self.register_buffer("running_mean", torch.randn(c))
        self.register_buffer("running_var", torch.rand(c) + 0.5)
        self.act = nn.ReLU()

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected a 4-d input")
        batch_stats = self.training or self.running_mean is None  # as timm decides it
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, batch_stats, 0.1, 1e-3)
        return self.act(x)


@pytest.mark.parametrize("affine", [True, False])
def test_a_functional_batch_norm_folds_like_the_module(affine):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), _NormAct(8, affine), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 9, 9)
    out = collapse(net, egp_fast.measure_entropy(net, [x], progress=False), x, sites=[], measure_latency=False)
    assert [e["layers"] for e in out.removed if e["kind"] == "bn_fold"] == [["0", "1"]]
    assert not any(n.target in (F.batch_norm, torch._assert) for n in out.model.graph.nodes)
    torch.testing.assert_close(out.model(x), net(x), rtol=1e-5, atol=1e-5)
    # batch statistics (running stats not given) stay a call: nothing to fold them with
    batch_stats = net[1]
    batch_stats.running_mean = batch_stats.running_var = None
    out = collapse(net, egp_fast.measure_entropy(net, [x], progress=False), x, sites=[], measure_latency=False)
    assert not [e for e in out.removed if e["kind"] == "bn_fold"]
    torch.testing.assert_close(out.model(x), net(x), rtol=1e-5, atol=1e-5)
    wrong = torch.randn(3, 9, 9)  # the assert held on the example's rank only; a conv still checks it
    with pytest.raises(RuntimeError):
        out.model(wrong[None, None])
