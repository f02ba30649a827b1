"""Pruner step by step: measure, plan, apply, track, and the masked-linear swap."""

import pytest
import torch
import torch.nn as nn

import egp_fast
from egp_fast.errors import ConfigError


def test_stepwise_pruner_matches_contract():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 2))
    x = torch.randn(32, 5)
    p = egp_fast.Pruner(model, x, step=0.5, progress=False)
    assert p.prunable == ["0", "2"]
    stats = p.measure([x])
    plan = p.plan(stats)
    # the plan is the allocation of docs/algorithm.md: allocate() over entropy and mean |w| with B = step * eligible
    entropy = {"0": stats.sites["1"].entropy, "2": stats.sites["3"].entropy}
    assert all(h > 0 for h in entropy.values())
    magnitude = {n: float(model[int(n)].weight.detach().abs().mean()) for n in entropy}
    remaining = {"0": 60, "2": 144}
    expected = egp_fast.allocate(entropy, magnitude, remaining, 0.5 * 204)
    assert set(plan) == {"0", "2"}
    assert all(abs(plan[n] - expected[n]) <= 1 for n in plan), (plan, expected)
    assert 0.5 * 204 - 2 <= sum(plan.values()) <= 0.5 * 204
    p.apply(plan)
    assert p.sparsity() == pytest.approx(sum(plan.values()) / 204)
    for n, k in plan.items():  # exactly plan[n] weights of each layer are now zero
        assert int((model[int(n)].weight == 0).sum()) == k == int((~model[int(n)].weight_mask).sum())
    with pytest.raises(ConfigError, match="only"):
        p.apply({"0": 10_000})
    with pytest.raises(ConfigError, match="does not prune"):
        p.apply({"4": 1})


def test_pruner_measure_takes_the_options_of_measure_entropy():
    model = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 2))
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(64, 5, generator=g) for _ in range(12)]
    p = egp_fast.Pruner(model, data[0], progress=True)
    quiet = p.measure(data[:2], progress=False)
    assert quiet.batches == 2
    direct = egp_fast.measure_entropy(model, data, stop="decided", tol=0.2, progress=False)
    via = p.measure(data, stop="decided", tol=0.2, progress=False)
    assert via.batches == direct.batches < len(data)
    assert p.measure(data, stop=None, tol=0.2, progress=False).batches == len(data)
    res = egp_fast.prune(model, data, iterations=1, measure_stop="decided", progress=False)
    assert res.rounds[0].stats["batches"] < len(data)
    with pytest.raises(ConfigError, match="measure_stop"):
        egp_fast.prune(model, data, measure_stop="early", progress=False)


def test_track_counts_training_forwards_for_plan():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 2))
    x = torch.randn(4, 5)
    p = egp_fast.Pruner(model, x, progress=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
    with p.track() as t:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(16, 5)).sum().backward()
            opt.step()
        model.eval()
        model(torch.randn(16, 5))  # an eval forward inside the block is not counted
        model.train()
    st = t.stats()
    assert list(st.sites) == ["1", "3"] and st.sites["1"].samples == 48
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()] == hooks
    plan = p.plan(st)
    assert set(plan) == {"0", "2"} and sum(plan.values()) > 0.45 * 204
    p.apply(plan)
    assert p.sparsity() == pytest.approx(sum(plan.values()) / 204)


def test_track_in_paper_mode_counts_what_measure_counts_in_paper_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(8, 4, generator=g) for _ in range(3)]
    p = egp_fast.Pruner(model, data[0], entropy_mode="paper", progress=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # train-mode steps that change nothing
    with p.track() as t:
        for x in data:
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    tracked = t.stats()
    measured = p.measure(data)
    exact = egp_fast.measure_entropy(model, data, mode="exact", progress=False)
    assert tracked.mode == measured.mode == "paper" and tracked.batches == 3
    assert list(tracked.sites) == list(measured.sites) == ["1", "3"]
    for name in measured.sites:
        assert tracked.sites[name].entropy == pytest.approx(measured.sites[name].entropy, abs=1e-6)
    # paper and exact entropies differ on these batches: exact counts labelled "paper" would fail
    assert any(abs(measured.sites[n].entropy - exact.sites[n].entropy) > 1e-3 for n in measured.sites)
    assert p.plan(tracked) == p.plan(measured)
