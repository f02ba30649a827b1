"""torch.fx tracing (egp_fast/graph/tracer.py, tracing.py): leaves, modules called but not installed."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import egp_fast


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


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act, self.head = nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(F.gelu(self.act(self.fc(x))))


def test_trace_keeps_activation_and_weight_modules_as_leaves_and_shares_parameters():
    net = _Branchy()
    gm = egp_fast.trace(net)
    calls = [(n.op, n.target) for n in gm.graph.nodes if n.op in ("call_module", "call_function")]
    assert calls == [("call_module", "fc"), ("call_module", "act"), ("call_function", F.gelu),
                     ("call_module", "head")]
    assert gm.fc.weight is net.fc.weight  # a view of the same network, not a copy
    x = torch.randn(5, 3)
    assert torch.equal(gm(x), net(x))


def test_propagate_shapes_records_node_shapes():
    net = _Branchy()
    gm = egp_fast.trace(net)
    egp_fast.graph.propagate_shapes(net, gm, (torch.randn(5, 3),), {})
    shapes = {n.name: n.meta.get("egp_shape") for n in gm.graph.nodes}
    assert shapes["fc"] == (5, 4) and shapes["head"] == (5, 2)


# Shape passes that skip plain convolutions (tracing.py, _ShapeRecorder(fast=True)).


class _Convs(nn.Module):
    """Every shape rule of a convolution: strides, dilation, groups, 'same'/'valid', 1d/2d/3d,
    a non-zero padding mode (computed for real), then layers that read the shapes."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 8, 5, padding="same", dilation=2, groups=4, bias=False)
        self.c3 = nn.Conv2d(8, 6, (3, 2), stride=(1, 3), padding="valid")
        self.c4 = nn.Conv2d(6, 6, 3, padding=2, padding_mode="reflect")
        self.d1 = nn.Conv1d(6, 4, 3, stride=2)
        self.t1 = nn.Conv3d(1, 2, (1, 3, 3), padding=(0, 1, 1))
        self.act = nn.ReLU()
        self.bn, self.bn1 = nn.BatchNorm2d(8), nn.BatchNorm1d(4)
        self.head = nn.LazyLinear(3)

    def forward(self, x):
        y = self.act(self.c4(self.c3(self.c2(self.act(self.bn(self.c1(x)))))))
        z = self.bn1(self.d1(y.flatten(2)))
        w = self.t1(y[:, :1].unsqueeze(1))
        return self.head(torch.cat([z.flatten(1), w.flatten(1)], 1))


def _recorded(gm, fast, x):
    from egp_fast.graph.tracing import _ShapeRecorder

    for n in gm.graph.nodes:
        n.meta.pop("egp_shape", None)
    with torch.no_grad():
        _ShapeRecorder(gm, fast=fast).run(x)
    return {n.name: n.meta.get("egp_shape") for n in gm.graph.nodes}


def test_shape_pass_without_convolutions_records_the_shapes_of_the_real_one():
    from egp_fast.graph.tracing import _shapes_value_free

    net = _Convs().eval()
    x = torch.randn(2, 3, 17, 23)
    net(x)  # materialise the lazy head
    gm = egp_fast.trace(net)
    assert _shapes_value_free(gm)
    real = _recorded(gm, False, x)
    calls = {"c1": 0, "c4": 0, "bn": 0, "bn1": 0}
    for name in calls:
        getattr(net, name).register_forward_hook(
            lambda m, i, o, name=name: calls.__setitem__(name, calls[name] + 1)
        )
    assert _recorded(gm, True, x) == real
    # the plain convolutions and batch norms were skipped, the reflect-padded convolution ran
    assert calls == {"c1": 0, "c4": 1, "bn": 0, "bn1": 0}
    assert real["c3"] == (2, 6, 7, 4) and real["d1"] == (2, 4, 26) and real["t1"] == (2, 2, 1, 9, 6)


@pytest.mark.parametrize("shape", [(1, 5, 8, 8), (1, 3, 2, 2), (3, 8, 8)])
def test_shape_pass_rejects_what_the_convolution_rejects(shape):
    # 5 channels instead of 3; an input smaller than the kernel; an unbatched input (which the
    # real convolution accepts, so the shape pass must not reject it either)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    gm = egp_fast.trace(net)
    x = torch.randn(*shape)
    try:
        with torch.no_grad():
            expected = tuple(net(x).shape)
    except (RuntimeError, ValueError):
        with pytest.raises(egp_fast.errors.DataError, match="example_inputs"):
            egp_fast.graph.propagate_shapes(net, gm, (x,), {})
    else:
        egp_fast.graph.propagate_shapes(net, gm, (x,), {})
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        assert out.meta["egp_shape"] == expected


class _ValueShaped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.act(self.conv(x))
        return y[y > 0.1]  # its shape depends on the convolution's values


class _Custom(nn.Conv2d):
    pass


def test_graphs_whose_shapes_depend_on_values_run_every_convolution():
    from egp_fast.graph.tracing import _shapes_value_free

    gm = egp_fast.trace(_ValueShaped())
    assert not _shapes_value_free(gm)
    x = torch.randn(2, 3, 6, 6)
    egp_fast.graph.propagate_shapes(gm, gm, (x,), {})
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    with torch.no_grad():
        expected = tuple(gm(x).shape)
    assert expected[0] > 0  # zeros in place of the convolution would give no element at all
    assert out.meta["egp_shape"] == expected
    # a user module (here a Conv2d subclass, whose forward could pad or look at values) is
    # never skipped, and is not a torch.nn module for the value check either
    gm = egp_fast.trace(nn.Sequential(_Custom(3, 4, 3), nn.ReLU()))
    assert not _shapes_value_free(gm)


def test_shape_pass_leaves_the_example_inputs_unchanged():
    # batch norm then an in-place ReLU: the stand-in for the batch norm's output must be a new
    # tensor, or the ReLU would write into the caller's batch
    net = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(inplace=True), nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    gm = egp_fast.trace(net)
    x = torch.randn(2, 3, 6, 6)
    before = x.clone()
    egp_fast.graph.propagate_shapes(net, gm, (x[:1],), {})
    assert torch.equal(x, before)
