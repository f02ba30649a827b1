import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import egp_fast
from egp_fast.errors import DataError, ModelError


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 8)
        self.fc4 = nn.Linear(8, 8)
        self.fc5 = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        x = self.fc3(x).relu()
        x = F.gelu(self.fc4(x))
        return self.fc5(x)


def test_resnet18_reused_relu_is_two_sites_with_block_producers():
    g = egp_fast.discover_sites(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))
    names = [s.name for s in g.sites]
    assert len(names) == 17
    assert names[1:3] == ["layer1.0.relu", "layer1.0.relu:1"]
    # relu after the residual add maps to the block's last conv, not the shortcut
    assert g.site("layer1.0.relu:1").producers == ["layer1.0.conv2"]
    assert g.site("layer2.0.relu:1").producers == ["layer2.0.conv2"]  # not downsample.0
    assert g.site("relu").producers == ["conv1"]
    assert all(s.channel_dim == 1 for s in g.sites)
    assert g.site("layer4.1.relu").channels == 512


def test_functional_activations_are_sites():
    g = egp_fast.discover_sites(Functional(), torch.randn(4, 6))
    kinds = [s.kind for s in g.sites]
    assert kinds == ["relu", "relu", "relu", "gelu"]
    assert [s.producers for s in g.sites] == [["fc1"], ["fc2"], ["fc3"], ["fc4"]]
    assert [s.module for s in g.sites] == [None] * 4
    assert g.sites[3].exact is False


def test_inplace_relu_and_bn_between():
    net = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(inplace=True), nn.Conv2d(5, 2, 1))
    g = egp_fast.discover_sites(net, torch.randn(2, 3, 8, 8))
    assert [(s.name, s.producers, s.channels) for s in g.sites] == [("2", ["0"], 5)]


@pytest.mark.parametrize(
    "act,kind,bps",
    [
        (nn.ReLU6(), "relu6", (0.0, 6.0)),
        (nn.Hardtanh(-2.0, 3.0), "hardtanh", (-2.0, 3.0)),
        (nn.LeakyReLU(0.1), "leaky_relu", (0.0,)),
        (nn.PReLU(4), "prelu", (0.0,)),
        (nn.SiLU(), "silu", (0.0,)),
        (nn.GELU(), "gelu", (0.0,)),
    ],
)
def test_supported_activations(act, kind, bps):
    net = nn.Sequential(nn.Conv2d(3, 4, 1), act)
    (s,) = egp_fast.discover_sites(net, torch.randn(2, 3, 4, 4)).sites
    assert (s.kind, s.breakpoints) == (kind, bps)


def test_token_layouts_use_last_dim():
    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)

        def forward(self, x):
            return x + self.fc2(self.act(self.fc1(x)))

    for shape in [(2, 5, 8), (2, 3, 3, 8)]:
        (s,) = egp_fast.discover_sites(Mlp(), torch.randn(*shape)).sites
        assert (s.channel_dim, s.channels, s.producers) == (-1, 16, ["fc1"])


def test_swin_and_vit_sites():
    g = egp_fast.discover_sites(torchvision.models.swin_t(), torch.randn(1, 3, 64, 64))
    assert len(g.sites) == 12 and all(s.kind == "gelu" and s.channel_dim == -1 for s in g.sites)
    assert g.sites[0].producers == ["features.1.0.mlp.0"]


def test_untraceable_model_falls_back_to_hooks():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), nn.ReLU()

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
                x = x * 2
            return self.act(self.fc(x))

    with pytest.warns(UserWarning, match="falling back to module hooks"):
        g = egp_fast.discover_sites(Dynamic(), torch.randn(3, 4))
    assert not g.traced
    assert [(s.name, s.producers) for s in g.sites] == [("act", ["fc"])]


def test_no_activation_is_a_model_error():
    with pytest.raises(ModelError, match="no supported activation"):
        egp_fast.discover_sites(nn.Linear(3, 3), torch.randn(2, 3))


def test_rejected_example_inputs_is_a_data_error_and_mode_restored():
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    net.train()
    with pytest.raises(DataError, match="failed on example_inputs"):
        egp_fast.discover_sites(net, torch.randn(2, 7))
    assert net.training


def test_inspect_prints_table(capsys):
    text = egp_fast.inspect(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))
    out = capsys.readouterr().out
    assert out == text
    assert "layer1.0.relu:1" in text and "layer1.0.conv2" in text and "17 sites" in text


# --------------------------------------------------------------------------------------------
# Activation recognition by behaviour (egp_fast.activations).

from egp_fast.graph.activations import activation_info  # noqa: E402
from egp_fast.errors import ConfigError  # noqa: E402


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


class _GeluFn(nn.Module):
    def forward(self, x):
        return F.gelu(x)


_MODULE_LEVEL_GELU = _GeluFn()  # like transformers' `gelu = get_activation("gelu")`


class _UsesModuleLevelAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(_MODULE_LEVEL_GELU(self.fc(x)))


def test_activation_module_called_but_not_installed_is_traced_into():
    g = egp_fast.discover_sites(_UsesModuleLevelAct(), torch.randn(2, 3))
    assert g.traced
    assert [(s.kind, s.producers) for s in g.sites] == [("gelu", ["fc"])]
    assert g.sites[0].name == "_GeluFn"
