"""EASIER's objective="latency": removal groups from the graph, their scores, the latency budget.

The groups are found on tiny models of the three shapes the objective is for (an inverted
residual, a bottleneck residual block, a transformer MLP); the choice is checked with planted
entropies (a stand-in statistics object), so which group wins is known in advance.
"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import egp_fast
from egp_fast.errors import ConfigError
from egp_fast.folding import RemovalGroup, flops_cost, layer_chains, predicted_speedup, removal_groups
from egp_fast.pruning import EasierMethod, MethodContext
from egp_fast.pruning.methods.easier import check_objective, pick_group


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand -> BN -> ReLU6 -> dw3x3 -> BN -> ReLU6 -> 1x1 -> BN, plus x."""

    def __init__(self, c=8, t=6):
        super().__init__()
        h = c * t
        self.expand, self.bn1, self.act1 = nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6()
        self.dw = nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False)
        self.bn2, self.act2 = nn.BatchNorm2d(h), nn.ReLU6()
        self.project, self.bn3 = nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return x + self.bn3(self.project(self.act2(self.bn2(self.dw(self.act1(self.bn1(self.expand(x))))))))


class Bottleneck(nn.Module):
    """ResNet's bottleneck: 1x1 -> ReLU -> 3x3 -> ReLU -> 1x1, plus x, then ReLU."""

    def __init__(self, c=16):
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(c, c // 4, 1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(c // 4, c // 4, 3, padding=1), nn.ReLU()
        self.conv3, self.out = nn.Conv2d(c // 4, c, 1), nn.ReLU()

    def forward(self, x):
        return self.out(x + self.conv3(self.relu2(self.conv2(self.relu1(self.conv1(x))))))


class Block(nn.Module):
    """A transformer block's MLP half: x + fc2(dropout(gelu(fc1(layernorm(x)))))."""

    def __init__(self, d=8, hidden=32):
        super().__init__()
        self.ln, self.fc1, self.act = nn.LayerNorm(d), nn.Linear(d, hidden), nn.GELU()
        self.drop, self.fc2 = nn.Dropout(0.1), nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.fc2(self.drop(self.act(self.fc1(self.ln(x)))))


def _two_mlps(first=64, second=32):
    """Two chains Linear(8, h) -> ReLU -> Linear(h, 8), split by a LayerNorm: sites "1" and "5"."""
    return nn.Sequential(nn.Linear(8, first), nn.ReLU(), nn.Linear(first, 8), nn.LayerNorm(8),
                         nn.Linear(8, second), nn.ReLU(), nn.Linear(second, 8))


def _groups(model, x, **kw):
    graph = egp_fast.discover_sites(model.eval(), x)
    return {tuple(g.sites): g.saving for g in removal_groups(layer_chains(graph), kw.pop("cost", flops_cost), **kw)}


def _planted(entropy, constant=()):
    return SimpleNamespace(sites={n: SimpleNamespace(entropy=h, collapsible=n in constant) for n, h in entropy.items()})


def _ctx(model, x):
    return MethodContext(model, egp_fast.discover_sites(model, x), {}, 0.5, None)


# -- groups found from the graph ---------------------------------------------------------------


def test_inverted_residual_needs_both_activations():
    x = torch.randn(2, 8, 8, 8)
    chains = layer_chains(egp_fast.discover_sites(InvertedResidual().eval(), x))
    assert [(c.layers, c.sites) for c in chains] == [(["expand", "dw", "project"], ["act1", "act2"])]
    groups = _groups(InvertedResidual(), x, exact=False)
    # 1x1 8->48, dw3x3 48, 1x1 48->8 against one dense 3x3 8->8, over 2*8*8 positions, 2 FLOPs a MAC.
    positions = 2 * 8 * 8
    assert groups == {("act1",): 0.0, ("act2",): 0.0,
                      ("act1", "act2"): 2 * positions * ((8 * 48 + 48 * 9 + 48 * 8) - 8 * 9 * 8)}
    # With exact=True the folded BatchNorm gives the 1x1 a bias, so composing it with the padded
    # depthwise conv is border-inexact and refused: no group saves anything.
    assert set(_groups(InvertedResidual(), x, exact=True).values()) == {0.0}


def test_inverted_residual_group_is_what_collapse_merges():
    torch.manual_seed(0)
    model, x = InvertedResidual().eval(), torch.randn(2, 8, 8, 8)
    stats = egp_fast.measure_entropy(model, [x], progress=False)
    egp_fast.folding.linearize_sites(model, stats, ["act1", "act2"], "identity")
    out = egp_fast.collapse(model, stats, x, exact=False, measure_latency=False, sites=[])
    assert (out.before["longest_path"], out.after["longest_path"]) == (3, 1)


def test_bottleneck_pair_and_the_shared_relu_after_the_add():
    x = torch.randn(2, 16, 6, 6)
    model = Bottleneck().eval()
    chains = layer_chains(egp_fast.discover_sites(model, x))
    # The ReLU after the residual add joins no two layers: it is in no chain.
    assert [(c.layers, c.sites) for c in chains] == [(["conv1", "conv2", "conv3"], ["relu1", "relu2"])]
    # A planted cost of one unit per layer: every merge saves a layer.
    groups = _groups(model, x, cost=lambda spec: 1.0, exact=False)
    assert groups == {("relu1",): 1.0, ("relu2",): 1.0, ("relu1", "relu2"): 2.0}
    # In FLOPs the merged 3x3 16->16 costs more than the bottleneck: nothing pays.
    assert set(_groups(model, x, exact=False).values()) == {0.0}


def test_transformer_mlp_activation_is_a_group_of_one():
    x = torch.randn(2, 5, 8)
    model = nn.Sequential(Block(), Block()).eval()
    chains = layer_chains(egp_fast.discover_sites(model, x))
    assert [(c.layers, c.sites) for c in chains] == [(["0.fc1", "0.fc2"], ["0.act"]), (["1.fc1", "1.fc2"], ["1.act"])]
    tokens = 2 * 5
    saving = 2 * tokens * (8 * 32 + 32 * 8 - 8 * 8)
    assert _groups(model, x) == {("0.act",): saving, ("1.act",): saving}


def test_longer_chain_gives_every_contiguous_run_and_already_removed_sites_count():
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 4))
    x = torch.randn(2, 4)
    assert set(_groups(model, x)) == {("1",), ("3",), ("5",), ("1", "3"), ("3", "5"), ("1", "3", "5")}
    assert set(_groups(model, x, max_group=2)) == {("1",), ("3",), ("5",), ("1", "3"), ("3", "5")}
    # Counting "1" and "3" as removed, "5" alone unlocks the merge of the whole chain into 4->4.
    # 4->32->32->32 already merges into 4->32; with "5" the whole chain is one 4->4 layer.
    assert _groups(model, x, removed=["1", "3"]) == {("5",): 2 * 2 * ((32 * 4 + 4 * 32) - 4 * 4)}


def test_predicted_speedup_counts_every_weight_layer():
    model, x = _two_mlps(), torch.randn(3, 8)
    graph = egp_fast.discover_sites(model, x)
    base = 2 * 3 * (8 * 64 * 2 + 8 * 32 * 2)
    p = predicted_speedup(graph, flops_cost, removed=["1"])
    assert p["before"] == base and p["after"] == base - 2 * 3 * (8 * 64 * 2 - 64)
    assert p["speedup"] == pytest.approx(base / p["after"])
    assert predicted_speedup(graph, flops_cost)["speedup"] == 1.0


# -- the choice ----------------------------------------------------------------------------------


def test_latency_picks_least_entropy_per_saving_not_least_entropy():
    model, x = _two_mlps(), torch.randn(3, 8)
    ctx = _ctx(model, x)
    # Savings per token: chain "1" 8*64*2 - 64 = 960 MACs, chain "5" 8*32*2 - 64 = 448.
    stats = _planted({"1": 0.5, "5": 0.3})  # 0.5/960 < 0.3/448
    assert EasierMethod().plan(ctx, stats, {}) == {"5": 1}
    method = EasierMethod(objective="latency")
    assert method.plan(ctx, stats, {}) == {"1": 1}
    assert method.last["group"] == ["1"] and method.last["metric"] == "flops"
    assert method.last["predicted_speedup"] == pytest.approx((1024 + 512) / (1024 + 512 - 960))
    rule = method.plan_rule(ctx)
    assert rule([0.5, 0.3], [False, False]) == {"1": 1.0, "5": 0.0}
    # A dearer first site tips the balance: 0.9/960 > 0.3/448.
    assert method.plan(ctx, _planted({"1": 0.9, "5": 0.3}), {}) == {"5": 1}
    assert rule([0.9, 0.3], [False, False]) == {"1": 0.0, "5": 1.0}


def test_constant_sites_still_go_and_cost_nothing():
    model, x = _two_mlps(), torch.randn(3, 8)
    method = EasierMethod(objective="latency")
    plan = method.plan(_ctx(model, x), _planted({"1": 0.0, "5": 0.3}, constant={"1"}), {})
    assert plan == {"1": 1, "5": 1} and method.last["group"] == ["5"]


def test_groups_that_save_nothing_fall_back_to_the_lowest_entropy_site():
    # Linear(8, 4) -> ReLU -> Linear(4, 8): the merged 8x8 layer costs more than the pair.
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 4), nn.ReLU(),
                          nn.Linear(4, 8))
    method = EasierMethod(objective="latency")
    assert method.plan(_ctx(model, torch.randn(3, 8)), _planted({"1": 0.6, "5": 0.2}), {}) == {"5": 1}
    assert method.last["group"] == ["5"] and method.last["saving"] == 0.0
    assert method.last["predicted_speedup"] == 1.0


def test_pick_group_ties_and_unknown_sites():
    groups = [RemovalGroup(["b"], [], 4.0, "flops"), RemovalGroup(["a"], [], 4.0, "flops"),
              RemovalGroup(["z"], [], 100.0, "flops")]
    # Equal scores: the group starting first in execution order wins; "z" is not a candidate.
    assert pick_group(["a", "b"], [0.5, 0.5], [False, False], groups) == (["a"], groups[1])
    assert pick_group(["a", "b"], [0.5, 0.5], [False, False], []) == (["a"], None)


# -- the loop --------------------------------------------------------------------------------------


def test_objective_sites_is_unchanged():
    data = [torch.randn(64, 8)]
    runs = []
    for kw in ({}, {"objective": "sites"}):
        torch.manual_seed(0)
        res = egp_fast.prune(_two_mlps(), data, method="easier", evaluate=lambda m: 0.9, iterations=5,
                             progress=False, **kw)
        runs.append([r.removed_sites for r in res.rounds])
        assert all(r.group == [] and r.predicted_speedup is None and r.measured_speedup is None for r in res.rounds)
    assert runs[0] == runs[1] and len(runs[0]) == 2


def test_target_speedup_stops_and_records_speedups():
    data = [torch.randn(64, 8)]
    torch.manual_seed(0)
    full = egp_fast.prune(_two_mlps(), data, method="easier", evaluate=lambda m: 0.9, iterations=5,
                          progress=False, objective="latency")
    assert len(full.rounds) == 2
    torch.manual_seed(0)
    res = egp_fast.prune(_two_mlps(), data, method="easier", evaluate=lambda m: 0.9, iterations=5,
                         progress=False, objective="latency", target_speedup=1.3, collapse=True)
    assert len(res.rounds) == 1 and res.best_round == 0
    rec = res.rounds[0]
    assert rec.group == rec.removed_sites and rec.predicted_speedup >= 1.3
    # Measured, not asserted: timings on a shared machine are noise; only that it was measured.
    assert isinstance(rec.measured_speedup, float) and math.isfinite(rec.measured_speedup)
    d = rec.to_dict()
    assert d["group"] == rec.group and d["predicted_speedup"] == rec.predicted_speedup
    assert d["measured_speedup"] == rec.measured_speedup
    assert res.config["objective"] == "latency" and res.config["target_speedup"] == 1.3
    assert res.collapse.after["longest_path"] == 3


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"objective": "fast"}, ["objective='fast'", "'sites'", "'latency'"]),
        ({"objective": "latency", "target_speedup": 1.0}, ["target_speedup=1.0", "> 1.0"]),
        ({"objective": "latency", "target_speedup": float("nan")}, ["target_speedup=nan", "> 1.0"]),
        ({"objective": "latency", "target_speedup": True}, ["target_speedup=True"]),
        ({"target_speedup": 2.0}, ["target_speedup=2.0", "objective='latency'"]),
        ({"objective": "latency", "fold": "always"}, ["fold='always'", "fold='auto'", "fold='latency'"]),
    ],
)
def test_errors_name_the_argument_and_the_fix(kwargs, words):
    with pytest.raises(ConfigError) as e:
        egp_fast.prune(_two_mlps(), [torch.randn(8, 8)], method="easier", evaluate=lambda m: 0.9, progress=False,
                       **kwargs)
    assert all(w in str(e.value) for w in words), str(e.value)
    with pytest.raises(ConfigError):
        EasierMethod(**{k: v for k, v in kwargs.items()})


def test_latency_objective_is_easier_only_and_fold_is_checked():
    with pytest.raises(ConfigError, match="only method='easier'"):
        egp_fast.prune(_two_mlps(), [torch.randn(8, 8)], method="egp", objective="latency", progress=False)
    with pytest.raises(ConfigError, match="fold='sometimes'"):
        egp_fast.prune(_two_mlps(), [torch.randn(8, 8)], fold="sometimes", progress=False)
    assert check_objective("sites", None, "always") is None


def test_mobilenet_v2_groups_are_the_inverted_residual_pairs():
    torchvision = pytest.importorskip("torchvision")
    x = torch.randn(1, 3, 32, 32)
    graph = egp_fast.discover_sites(torchvision.models.mobilenet_v2().eval(), x)
    chains = layer_chains(graph)
    groups = removal_groups(chains, flops_cost, exact=False)
    paying = [g.sites for g in groups if g.saving > 0]
    # 17 chains (the stem, whose block has no expansion, and 16 inverted residuals) of two sites
    # each; in FLOPs only the pairs of the 16 expanded blocks pay, never a single activation.
    assert len(chains) == 17 and all(len(c.sites) == 2 for c in chains)
    assert len(paying) == 16 and all(len(s) == 2 and s[0].endswith("conv.0.2") for s in paying)
    removed = [s for g in paying for s in g]
    # The prediction is the fold plan's: the FLOPs of the model collapsed with those pairs removed.
    assert predicted_speedup(graph, flops_cost, exact=False, removed=removed)["speedup"] > 1.2


def test_pruner_method_options_reach_the_method_and_are_checked():
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(8, 4)
    p = egp_fast.Pruner(net, x, method="easier", progress=False,
                        method_options={"objective": "latency", "target_speedup": 1.2})
    assert p.method_impl.objective == "latency" and p.method_impl.target_speedup == 1.2
    assert egp_fast.Pruner(net, x, method="easier", progress=False).method_impl.objective == "sites"
    with pytest.raises(ConfigError, match="method_options must be a dict"):
        egp_fast.Pruner(net, x, method_options=[("objective", "latency")])
    for method in ("egp", "imp"):  # options of another method are refused, not ignored
        with pytest.raises(ConfigError, match=f"method='{method}' takes no options, got \\['objective'\\]"):
            egp_fast.Pruner(net, x, method=method, method_options={"objective": "latency"})
