"""Recorders: hooks on the real model's activation modules, the instrumented traced graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import egp_fast
from egp_fast.errors import ModelError
from egp_fast.measurement.recorders import _HookRecorder


def test_module_called_a_varying_number_of_times_warns():
    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.act = nn.ReLU()
            self.n = 1

        def forward(self, x):
            for _ in range(self.n):
                x = self.act(self.fc(x))
            return x

    net = Loop()
    egp_fast.measure_entropy(net, [torch.randn(4, 3)], progress=False)  # discovers 1 call
    net.n = 3
    with pytest.warns(UserWarning, match="different number of times"):
        s = egp_fast.measure_entropy(net, [torch.randn(4, 3)], progress=False)
    assert list(s.sites) == ["act"] and s.sites["act"].samples == 4


def test_hooks_on_a_module_the_model_does_not_have_are_refused_and_none_left():
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU())
    other = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    graph = egp_fast.discover_sites(net, torch.randn(2, 2))
    with pytest.raises(ModelError, match="not a submodule"):
        _HookRecorder(other, list(enumerate(graph.sites)), counter=None)
    assert all(not m._forward_pre_hooks for m in other.modules())


def test_the_instrumented_graph_is_built_once_and_keeps_no_counts():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)

        def forward(self, x):
            return F.relu(self.fc(x))

    net = Functional()
    graph = egp_fast.discover_sites(net, torch.randn(2, 4))
    x = torch.randn(8, 4)
    first = egp_fast.measure_entropy(net, [x], graph=graph, progress=False)
    gm = graph._egp_instrumented
    second = egp_fast.measure_entropy(net, [x, x], graph=graph, progress=False)
    assert graph._egp_instrumented is gm  # reused by the next pass
    assert gm._egp_recorder.counter is None  # the counts of a finished pass are not kept alive
    assert dict(gm.named_parameters())["fc.weight"] is net.fc.weight  # shares the model's weights
    (name,) = first.sites
    assert second.sites[name].on_counts.tolist() == (2 * first.sites[name].on_counts).tolist()
