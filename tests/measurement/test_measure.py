"""measure_entropy: the pass over the data runs the model the user runs (issue 11 §2).

* sites that are modules are counted by hooks on the real model; a model with functional
  activations goes through the fx-traced graph, checked against ``model.forward`` on batch 0;
* the model's own exceptions reach the user, model restored;
* bad arguments and data are named; NaN/Inf is found and located.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _models import Identityish

import egp_fast
from egp_fast.errors import ConfigError, DataError, ModelError, NumericsError
from egp_fast.measurement.measure import _finite_probe


class FailsOnSecondCall(nn.Module):
    """Raises on its second forward: fx tracing is the first (a Python-side call counter)."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(6, 2)
        self.functional = functional
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("no second forward, please")
        h = self.fc1(x)
        return self.fc2(F.relu(h) if self.functional else self.act(h))


@pytest.mark.parametrize("functional", [False, True], ids=["modules", "functional"])
def test_model_exception_reaches_the_user_and_model_is_restored(functional):
    net = FailsOnSecondCall(functional)
    net.train()
    with pytest.raises(DataError, match="no second forward, please") as info:
        egp_fast.measure_entropy(net, [torch.randn(8, 4)] * 3, progress=False)
    assert isinstance(info.value.__cause__, RuntimeError)  # the model's own exception, chained
    assert str(info.value.__cause__) == "no second forward, please"
    assert net.calls == 2  # the real forward ran (it used to be skipped: the trace was measured)
    assert all(m.training for m in net.modules())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())


def test_keyboard_interrupt_in_forward_passes_through_untouched():
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    net[0].register_forward_pre_hook(lambda m, i: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        egp_fast.measure_entropy(net, [torch.randn(2, 3)], progress=False)
    assert not net[1]._forward_pre_hooks


class Flipper(nn.Module):
    """Negates the pre-activation from its second call on: a Python-side branch fx froze."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(7, 3)
        self.functional = functional
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        h = self.fc1(x)
        if self.calls > 1:
            h = -h
        return self.fc2(F.relu(h) if self.functional else self.act(h))


def test_python_side_branch_with_functional_sites_is_a_clear_error():
    net = Flipper(functional=True)
    with pytest.raises(ModelError, match="does not compute what model.forward computes") as info:
        egp_fast.measure_entropy(net, [torch.randn(16, 5)], progress=False)
    assert "relu" in str(info.value)  # names the functional site hooks cannot see
    assert all(not m._forward_pre_hooks for m in net.modules())


def test_python_side_branch_with_module_sites_measures_the_real_forward():
    net = Flipper(functional=False)
    x = torch.randn(64, 5)
    s = egp_fast.measure_entropy(net, [x], progress=False).sites["act"]
    with torch.no_grad():
        real = -net.fc1(x)  # what model.forward feeds the ReLU now
    assert s.on_counts.tolist() == (real > 0).sum(0).tolist()


def test_traced_path_is_checked_and_agrees_on_a_plain_functional_model():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)

        def forward(self, x):
            return F.relu(self.fc(x))

    net = Plain()
    x = torch.randn(32, 4)
    s = egp_fast.measure_entropy(net, [x, x], progress=False)
    (site,) = s.sites.values()
    with torch.no_grad():
        assert site.on_counts.tolist() == (2 * (net.fc(x) > 0).sum(0)).tolist()


# --------------------------------------------------------------------------------------------
# Arguments, data and numerics.


def test_mode_restored_and_no_hooks_left():
    net = Identityish()
    net.train()
    egp_fast.measure_entropy(net, [torch.randn(2, 3, 2, 2)], progress=False)
    assert net.training and all(m.training for m in net.modules())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())


def test_bad_inputs():
    net = Identityish()
    with pytest.raises(DataError, match="no batches"):
        egp_fast.measure_entropy(net, [], progress=False)
    with pytest.raises(ConfigError, match="mode="):
        egp_fast.measure_entropy(net, [torch.randn(1, 3, 2, 2)], mode="bogus", progress=False)
    with pytest.raises(DataError, match="failed on"):
        egp_fast.measure_entropy(net, [torch.randn(1, 3, 2, 2), torch.randn(1, 5, 2, 2)], progress=False)
    with pytest.raises(DataError, match="is on meta but the model is on cpu"):
        egp_fast.measure_entropy(net, [torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2, device="meta")],
                                 progress=False)


def test_nan_names_the_site():
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU())
    with torch.no_grad():
        net[2].weight[0, 0] = float("nan")
    with pytest.raises(NumericsError, match="site '3'"):
        egp_fast.measure_entropy(net, [torch.randn(3, 2)], progress=False)
    assert all(not m._forward_pre_hooks for m in net.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_finite_probe_flags_exactly_the_outputs_with_nan_or_inf(dtype):
    big = torch.finfo(dtype).max
    clean = torch.full((64, 100), big, dtype=dtype)  # sums far past the dtype's range: still finite
    clean[1::2] = -big
    clean[0, 0] = big
    assert math.isfinite(float(_finite_probe(clean) + _finite_probe(clean[:7])))
    for bad in (math.nan, math.inf, -math.inf):
        t = clean.clone()
        t[5, 17] = bad
        assert not math.isfinite(float(_finite_probe(t))), bad
        assert not math.isfinite(float(_finite_probe(clean) + _finite_probe(t)))  # across batches
    both = clean.clone()
    both[0, 0], both[0, 1] = math.inf, -math.inf  # +inf and -inf: NaN, still flagged
    assert not math.isfinite(float(_finite_probe(both)))


def test_nan_in_the_output_alone_is_found():
    class NaNHead(nn.Module):  # the site stays finite; only the model's output is NaN
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(2, 3), nn.ReLU())

        def forward(self, x):
            return self.body(x) * torch.tensor([1.0, math.inf, 0.0])

    with pytest.raises(NumericsError, match="in the model's output"):
        egp_fast.measure_entropy(NaNHead(), [torch.ones(4, 2)], progress=False)


