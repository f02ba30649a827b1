"""Site discovery (egp_fast/graph/discovery.py): sites, kinds, the hooks fallback, inspect, unwrap_model."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import egp_fast
from egp_fast.errors import DataError, ModelError
from egp_fast.graph import unwrap_model


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


def test_functional_activations_are_sites():
    g = egp_fast.discover_sites(Functional(), torch.randn(4, 6))
    kinds = [s.kind for s in g.sites]
    assert kinds == ["relu", "relu", "relu", "gelu"]
    assert [s.producers for s in g.sites] == [["fc1"], ["fc2"], ["fc3"], ["fc4"]]
    assert [s.module for s in g.sites] == [None] * 4
    assert g.sites[3].exact is False


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


def test_unwrap_model_strips_data_parallel_and_compile_wrappers():
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    assert unwrap_model(m) is m
    assert unwrap_model(nn.DataParallel(m)) is m
    compiled = torch.compile(nn.DataParallel(m))  # wrapped only: nothing is compiled until called
    assert unwrap_model(compiled) is m
    # site names carry no wrapper prefix (module., _orig_mod.)
    assert [s.name for s in egp_fast.discover_sites(compiled, torch.randn(2, 3)).sites] == ["1"]
    assert egp_fast.graph.weight_layers(compiled) == ["0"]


class _WithBuffer(nn.Module):
    def __init__(self, functional=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()
        self.register_buffer("scale", torch.full((1, 4, 1, 1), 2.0), persistent=False)
        self.functional = functional

    def forward(self, x):
        y = self.act(self.conv(x)) * self.scale
        return y + F.relu(x).mean() if self.functional else y


def test_graph_module_is_built_on_first_use_and_equals_an_eager_trace(monkeypatch):
    import egp_fast.graph.tracer as tracer

    built = []
    orig = tracer._graph_module
    monkeypatch.setattr(tracer, "_graph_module", lambda *a: built.append(a) or orig(*a))
    net = _WithBuffer().eval()
    x = torch.randn(2, 3, 6, 6)
    g = egp_fast.discover_sites(net, x)
    assert built == [] and g.traced  # discovery itself never builds it
    egp_fast.measure_entropy(net, [x], graph=g, progress=False)
    assert built == []  # nor does measuring through hooks
    gm = g.graph_module
    assert len(built) == 1 and g.graph_module is gm  # built once, then kept
    eager = egp_fast.trace(net)
    torch.testing.assert_close(gm(x), net(x))
    assert dict(gm.named_modules()).keys() == dict(eager.named_modules()).keys()
    assert gm.act is net.act and gm.conv.weight is net.conv.weight  # a view of the model
    assert "scale" not in gm.state_dict()  # the buffer stays non-persistent, as in fx's copy


def test_a_site_graph_outlives_its_model():
    import gc
    import weakref

    net = _WithBuffer(functional=True).eval()
    x = torch.randn(2, 3, 6, 6)
    want = net(x)
    g = egp_fast.discover_sites(net, x)
    act, ref = net.act, weakref.ref(net)
    del net
    gc.collect()
    assert ref() is None  # the graph does not keep the model alive ...
    gm = g.graph_module  # ... and still builds its module from the layers it names
    assert gm.act is act
    torch.testing.assert_close(gm(x), want)


def test_a_site_graph_pickles_with_its_graph_module():
    import pickle

    net = _WithBuffer(functional=True).eval()
    x = torch.randn(2, 3, 6, 6)
    g = pickle.loads(pickle.dumps(egp_fast.discover_sites(net, x)))
    assert [s.name for s in g.sites] == ["act", "relu"] and g.traced
    torch.testing.assert_close(g.graph_module(x), net(x))


class _BNWrapper(nn.Module):
    """A batch norm written outside torch.nn (like timm's BatchNormAct2d): fx traces into it."""

    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, 1e-5)


class _TrainBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3), _BNWrapper(8), nn.Linear(8, 2)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = F.dropout(x.mean((2, 3)), 0.5, self.training)
        return self.fc(x)


def test_a_model_in_train_mode_is_traced_as_in_eval_mode_and_left_untouched():
    torch.manual_seed(0)
    net = nn.Sequential(_TrainBranches())  # the functional calls sit in a submodule
    x = torch.randn(4, 3, 10, 10) + 3.0
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    g = egp_fast.discover_sites(net, x)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # no stats updated
    assert all(m.training for m in net.modules())
    # the graph computes eval mode (no batch statistics, no dropout), as measurement runs it
    with torch.no_grad():
        torch.testing.assert_close(g.graph_module(x), net.eval()(x))
    net.train()
    train_mode = egp_fast.measure_entropy(net, [x, x + 1], progress=False)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    eval_mode = egp_fast.measure_entropy(net.eval(), [x, x + 1], progress=False)
    assert {k: s.entropy for k, s in train_mode.sites.items()} == {k: s.entropy for k, s in eval_mode.sites.items()}


def test_a_fully_linearised_model_says_so_and_the_suggested_collapse_works():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    data = [torch.randn(16, 4)]
    stats = egp_fast.measure_entropy(net, data, progress=False)
    egp_fast.linearize(net, stats, sites=list(stats.sites), how="identity")
    with pytest.raises(ModelError, match=r"every activation of Sequential has been linearised \(2 ChannelAffine"):
        egp_fast.measure_entropy(net, data, progress=False)
    out = egp_fast.collapse(net, egp_fast.EntropyStats({}, "exact", 0), data[0], measure_latency=False)
    assert sorted(out.removed_sites) == ["1", "3"] and out.after["longest_path"] == 1


def test_a_graph_module_built_after_the_model_changed_runs_what_was_traced():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(16, 4)
    want = net(x)
    g = egp_fast.discover_sites(net, x)
    relu = net[1]
    egp_fast.linearize(net, egp_fast.measure_entropy(net, [x], progress=False), sites=["1"], how="identity")
    assert net[1] is not relu  # swapped for a ChannelAffine
    gm = g.graph_module  # built now: still the ReLU the graph was traced with
    assert gm.get_submodule("1") is relu and gm.get_submodule("0") is net[0]
    torch.testing.assert_close(gm(x), want)
