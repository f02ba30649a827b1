"""track_entropy: counting activation states during the training forwards (issue 13)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _models import gaussian_batches

import egp_fast
from egp_fast.errors import ConfigError, DataError
from egp_fast.measurement import track_entropy


def _mlp():
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))


def test_tracking_training_forwards_equals_an_eval_pass_when_nothing_changes():
    # No BatchNorm, no dropout, lr = 0: a train-mode forward computes what an eval one does.
    net = _mlp()
    data = gaussian_batches(4, 8)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    with track_entropy(net) as tracker:
        for x in data:
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
        tracked = tracker.stats()
    ref = egp_fast.measure_entropy(net, data, progress=False)
    assert tracker.batches == 4 and tracked.batches == 4 and tracked.samples == 32
    assert list(tracked.sites) == list(ref.sites) == ["1", "3"]
    for name in ref.sites:
        assert tracked.sites[name].on_counts.tolist() == ref.sites[name].on_counts.tolist()
        assert tracked.sites[name].samples == ref.sites[name].samples == 32
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())


def test_tracking_leaves_the_training_step_unchanged():
    torch.manual_seed(1)
    a = _mlp()
    b = _mlp()
    b.load_state_dict(a.state_dict())
    x = torch.randn(8, 4)
    a(x).square().mean().backward()
    with track_entropy(b):
        b(x).square().mean().backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa.grad, pb.grad)


def test_eval_forwards_are_not_counted_by_default():
    net = _mlp()
    with track_entropy(net) as tracker:
        net.eval()
        with torch.no_grad():
            net(torch.randn(4, 4))
        net.train()
        net(torch.randn(4, 4))
        assert tracker.batches == 1
    with track_entropy(net, training_only=False) as tracker:
        net.eval()
        net(torch.randn(4, 4))
        assert tracker.batches == 1


def test_tracker_removes_hooks_on_exceptions_and_reports_no_forward():
    net = _mlp()
    with pytest.raises(ZeroDivisionError):
        with track_entropy(net, example_inputs=torch.randn(2, 4)):
            raise ZeroDivisionError
    assert all(not m._forward_pre_hooks for m in net.modules())
    with track_entropy(net, example_inputs=torch.randn(2, 4)) as tracker:
        with pytest.raises(DataError, match="no forward"):
            tracker.stats()


def test_tracker_names_functional_sites_it_cannot_see():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 6)
            self.act = nn.ReLU()
            self.fc2 = nn.Linear(6, 6)

        def forward(self, x):
            return F.relu(self.fc2(self.act(self.fc1(x))))

    net = Mixed()
    with pytest.warns(UserWarning, match="functional"):
        with track_entropy(net) as tracker:
            net(torch.randn(8, 4))
    stats = tracker.stats()
    assert list(stats.sites) == ["act"] and stats.unmeasured == ["relu"]
    assert stats.to_dict()["unmeasured"] == ["relu"]


def test_tracker_with_a_pruner_graph_and_paper_mode():
    net = _mlp()
    graph = egp_fast.discover_sites(net, torch.randn(2, 4))
    data = gaussian_batches(3, 8)
    with track_entropy(net, graph=graph, mode="paper") as tracker:
        for x in data:
            net(x)
    s = tracker.stats()
    assert s.mode == "paper" and s.batches == 3
    # No BatchNorm, no dropout, no step: the tracked training forwards are an eval pass, so the
    # per-batch (paper) entropies must be measure_entropy's in paper mode, not the exact ones.
    ref = egp_fast.measure_entropy(net, data, mode="paper", progress=False)
    exact = egp_fast.measure_entropy(net, data, mode="exact", progress=False)
    assert list(s.sites) == list(ref.sites) == ["1", "3"]
    for name in ref.sites:
        assert s.sites[name].entropy == pytest.approx(ref.sites[name].entropy, abs=1e-6)
    # the two modes differ on these batches, so the comparison above tells them apart
    assert any(abs(ref.sites[n].entropy - exact.sites[n].entropy) > 1e-3 for n in ref.sites)
    with pytest.raises(ConfigError, match="mode="):
        with track_entropy(net, mode="bogus"):
            pass


# --------------------------------------------------------------------------------------------
# DDP: 1 process and 2 processes give identical statistics.


def test_stats_is_a_snapshot_and_counting_goes_on():
    net = _mlp()
    data = gaussian_batches(3, 8)
    with track_entropy(net) as tracker:
        net(data[0])
        first = tracker.stats()
        net(data[1])
        net(data[2])
        second = tracker.stats()
    assert first.batches == 1 and first.samples == 8
    assert second.batches == 3 and second.samples == 24
    ref = egp_fast.measure_entropy(net, data, progress=False)
    for name in ref.sites:
        assert second.sites[name].on_counts.tolist() == ref.sites[name].on_counts.tolist()
        # the first snapshot kept its own counts: later forwards did not change it
        assert first.sites[name].observations == 8
