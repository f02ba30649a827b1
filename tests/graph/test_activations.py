"""Activation recognition by behaviour and the registry (egp_fast/graph/activations.py)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import egp_fast
from egp_fast.errors import ConfigError
from egp_fast.graph.activations import activation_info


class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _Leaky(nn.Module):
    def forward(self, x):
        return torch.where(x > 0, x, 0.2 * x)


class _Clip(nn.Module):
    def forward(self, x):
        return x.clamp(-2.0, 3.0)


class _Clip6(nn.Module):
    def forward(self, x):
        return torch.clamp(x, 0, 6)


class _TanhGELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x**3)))


class _ErfGELU(nn.Module):
    def forward(self, x):
        return x * 0.5 * (1.0 + torch.erf(x / 2**0.5))


class _Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class _Rect(nn.Module):
    def forward(self, x):
        return x * (x > 0)


@pytest.mark.parametrize(
    "module, kind, params",
    [
        (_Rect(), "relu", {}),
        (_Leaky(), "leaky_relu", {"negative_slope": 0.2}),
        (_Clip(), "hardtanh", {"min_val": -2.0, "max_val": 3.0}),
        (_Clip6(), "relu6", {"min_val": 0.0, "max_val": 6.0}),
        (_ErfGELU(), "gelu", {"approximate": "none"}),
        (_TanhGELU(), "gelu", {"approximate": "tanh"}),
        (_Swish(), "silu", {}),
        (_QuickGELU(), "gelu", {"approximate": "quick"}),
    ],
)
def test_probing_recognises_user_activations(module, kind, params):
    assert activation_info(module) == (kind, params)


class _Scaled(nn.Module):
    def forward(self, x):
        return 2.0 * x


class _Square(nn.Module):
    def forward(self, x):
        return x * x.clamp_min(0)


class _Normalise(nn.Module):
    def forward(self, x):
        return x / x.abs().amax(-1, keepdim=True)


class _ClipHigh(nn.Module):  # clipped only far out: not GELU, whatever it looks like near 0
    def forward(self, x):
        return F.gelu(x).clamp(max=10.0)


class _TwoArgs(nn.Module):
    def forward(self, x, y):
        return F.relu(x + y)


@pytest.mark.parametrize(
    "module",
    [
        nn.Identity(),
        nn.Dropout(0.0),
        nn.Dropout(0.5).train(),
        nn.LayerNorm(4, elementwise_affine=False),
        nn.Softmax(-1),
        nn.Tanh(),
        nn.Sigmoid(),
        nn.ELU(),
        nn.Mish(),
        nn.Hardswish(),
        nn.Softplus(),
        _Scaled(),
        _Square(),
        _Normalise(),
        _ClipHigh(),
        _TwoArgs(),
        nn.Sequential(nn.ReLU()),  # a container, not a leaf
        nn.Linear(4, 4),  # has parameters
    ],
)
def test_probing_does_not_misfire(module):
    assert activation_info(module) is None


def test_probe_bypasses_hooks_and_keeps_training_flag():
    m = _Swish().train()
    seen = []
    m.register_forward_pre_hook(lambda mod, inp: seen.append(1))
    assert activation_info(m) == ("silu", {})
    assert seen == [] and m.training


def test_probe_is_cached_per_class_and_attributes(monkeypatch):
    from egp_fast.graph import activations as activations
    class Parametric(nn.Module):
        def __init__(self, slope):
            super().__init__()
            self.slope = slope

        def forward(self, x):
            return torch.where(x > 0, x, self.slope * x)

    calls = []
    real = activations._probe
    monkeypatch.setattr(activations, "_probe", lambda m: calls.append(m) or real(m))
    assert activation_info(Parametric(0.1)) == ("leaky_relu", {"negative_slope": 0.1})
    assert activation_info(Parametric(0.1)) == ("leaky_relu", {"negative_slope": 0.1})
    assert activation_info(Parametric(0.3)) == ("leaky_relu", {"negative_slope": 0.3})
    assert len(calls) == 2  # one probe per (class, slope)


def test_register_activation_wins_over_probing_and_validates():
    class Odd(nn.Module):  # behaves like ReLU; registered as something else, or as nothing
        def forward(self, x):
            return x.clamp_min(0)

    class Sub(Odd):
        pass

    from egp_fast.graph import activations as activations
    try:
        assert activation_info(Odd()) == ("relu", {})
        egp_fast.register_activation(Odd, "leaky_relu", {"negative_slope": 0.0})
        assert activation_info(Odd()) == ("leaky_relu", {"negative_slope": 0.0})
        assert activation_info(Sub()) == ("leaky_relu", {"negative_slope": 0.0})  # inherited
        egp_fast.register_activation(Odd, None)
        assert activation_info(Sub()) is None
        net = nn.Sequential(nn.Linear(3, 4), Odd(), nn.Linear(4, 2), nn.ReLU())
        assert [s.name for s in egp_fast.discover_sites(net, torch.randn(2, 3)).sites] == ["3"]
    finally:
        activations._REGISTRY.pop(Odd, None)
        activations._PROBE_CACHE.clear()
    with pytest.raises(ConfigError, match="kind='swish' is not supported"):
        egp_fast.register_activation(Odd, "swish")
    with pytest.raises(ConfigError, match="not an instance"):
        egp_fast.register_activation(Odd(), "relu")
    with pytest.raises(ConfigError, match="params"):
        egp_fast.register_activation(Odd, "relu", params=[1])


def test_registered_kind_reads_params_from_instance():
    from egp_fast.graph import activations as activations
    class MyLeaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.negative_slope = 0.05

        def forward(self, x):
            return F.leaky_relu(x, self.negative_slope)

    try:
        egp_fast.register_activation(MyLeaky, "leaky_relu")
        assert activation_info(MyLeaky()) == ("leaky_relu", {"negative_slope": 0.05})
    finally:
        activations._REGISTRY.pop(MyLeaky, None)
        activations._PROBE_CACHE.clear()


def test_probed_activation_is_a_site_with_producer_and_params():
    net = nn.Sequential(nn.Linear(3, 8), _Leaky(), nn.Linear(8, 8), _QuickGELU(), nn.Linear(8, 2))
    g = egp_fast.discover_sites(net, torch.randn(4, 3))
    assert [(s.name, s.kind, s.producers, s.params) for s in g.sites] == [
        ("1", "leaky_relu", ["0"], {"negative_slope": 0.2}),
        ("3", "gelu", ["2"], {"approximate": "quick"}),
    ]
    assert g.site("1").exact and not g.site("3").exact
