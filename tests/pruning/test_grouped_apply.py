"""WeightMethod.apply on a model big enough to select in groups: the same masks as the
reference, bit for bit (odd shapes, ties, NaN, layers already pruned), and all or nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import egp_fast
from egp_fast.ops import reference_select_smallest
from egp_fast.pruning.methods import base


def _net(dtype):
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Linear(13, 7, bias=False), nn.ReLU(),
        nn.Linear(7, 11, bias=False), nn.ReLU(),
        nn.Linear(11, 5, bias=False), nn.ReLU(),
        nn.Linear(5, 9, bias=False),
    ).to(dtype)
    with torch.no_grad():
        # ties: a few repeated magnitudes (both signs) per layer (NaN ranks last: the ops tests
        # cover it; measuring would reject it here)
        for m in net:
            if not isinstance(m, nn.Linear):
                continue
            w = m.weight.view(-1)
            w[::3] = 0.25
            w[1::5] = -0.25
            w[2::7] = 0.0
    return net


@pytest.mark.parametrize("group", [1, 60, 100, 1 << 30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["egp", "imp"])
def test_grouped_apply_gives_the_reference_masks(group, dtype, method, monkeypatch):
    monkeypatch.setattr(base, "GROUP_WEIGHTS", group)
    net = _net(dtype)
    x = torch.randn(16, 13, dtype=dtype)
    p = egp_fast.Pruner(net, x, step=0.5, method=method, progress=False)
    for _ in range(2):  # the second round starts from masks with pruned entries
        plan = p.plan(p.measure([x]))
        names = [n for n in plan if plan[n]]
        layers = {n: net.get_submodule(n) for n in names}
        want = reference_select_smallest(
            [layers[n].weight.detach().clone() for n in names],
            [layers[n].weight_mask.clone() for n in names],
            [plan[n] for n in names],
        )
        p.apply(plan)
        for n, w in zip(names, want):
            assert torch.equal(layers[n].weight_mask, w), n
            assert not layers[n].weight.detach()[~w].any()


@pytest.mark.parametrize("exc", [RuntimeError("injected"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_a_failure_in_a_later_group_changes_nothing(exc, monkeypatch):
    monkeypatch.setattr(base, "GROUP_WEIGHTS", 60)
    net = _net(torch.float32)
    x = torch.randn(16, 13)
    p = egp_fast.Pruner(net, x, step=0.5, method="imp", progress=False)
    plan = p.plan(p.measure([x]))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    real = egp_fast.ops.select_smallest
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise exc
        return real(*a, **k)

    monkeypatch.setattr(egp_fast.ops, "select_smallest", flaky)
    with pytest.raises(type(exc)):
        p.apply(plan)
    for k, v in before.items():
        assert torch.equal(net.state_dict()[k], v), k
