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


# Shape passes that skip plain convolutions (shapes.py, _ShapeRecorder(fast=True)).


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


def _count_calls(monkeypatch, net, names):
    """Count the calls of the named submodules by patching their classes' forward (a hook or an
    instance forward would itself make the shape pass run the module)."""
    calls = dict.fromkeys(names, 0)
    by_id = {id(getattr(net, n)): n for n in names}
    for cls in {type(getattr(net, n)) for n in names}:
        orig = cls.forward

        def forward(self, *a, _orig=orig, **k):
            if id(self) in by_id:
                calls[by_id[id(self)]] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(cls, "forward", forward)
    return calls


def _recorded(gm, fast, x):
    from egp_fast.graph.shapes import _ShapeRecorder

    for n in gm.graph.nodes:
        n.meta.pop("egp_shape", None)
    with torch.no_grad():
        _ShapeRecorder(gm, fast=fast).run(x)
    return {n.name: n.meta.get("egp_shape") for n in gm.graph.nodes}


def test_shape_pass_without_convolutions_records_the_shapes_of_the_real_one(monkeypatch):
    from egp_fast.graph.shapes import _shapes_value_free

    net = _Convs().eval()
    x = torch.randn(2, 3, 17, 23)
    net(x)  # materialise the lazy head
    gm = egp_fast.trace(net)
    assert _shapes_value_free(gm)
    real = _recorded(gm, False, x)
    calls = _count_calls(monkeypatch, net, ["c1", "c4", "bn", "bn1"])
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
    from egp_fast.graph.shapes import _shapes_value_free

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


class _Rules(nn.Module):
    """Every size rule of the shape-only pass (shapes.py): linear layers on 2-d and 3-d inputs,
    elementwise modules and functions, adds (broadcast, in place, with a number, with alpha,
    of mixed dtypes), flattens in every spelling, then layers the rules leave to the real call."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act, self.gelu, self.drop, self.ident = nn.ReLU(inplace=True), nn.GELU(), nn.Dropout(0.3), nn.Identity()
        self.fc = nn.Linear(6, 5)
        self.tok = nn.Linear(5, 4)
        self.pool = nn.AdaptiveAvgPool2d((2, 1))

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        y = y + self.conv.bias.view(1, -1, 1, 1)  # broadcast against a parameter
        y += 1.5
        y = torch.add(y, y, alpha=2).relu_()
        z = F.leaky_relu(self.gelu(self.drop(self.ident(y))), 0.2)
        t = self.tok(self.fc(z.permute(0, 2, 3, 1)))  # [N, H, W, 4]
        f = torch.flatten(t, 1, 2).relu() + torch.flatten(t, start_dim=1, end_dim=-2)
        g = self.pool(z).flatten(1) + z.double().mean((2, 3)).repeat(1, 2).float()
        return f.flatten(), g.add(1)


def test_shape_only_rules_record_the_shapes_of_the_real_pass(monkeypatch):
    from egp_fast.graph.shapes import _shapes_value_free

    net = _Rules().eval()
    gm = egp_fast.trace(net)
    assert _shapes_value_free(gm)
    x = torch.randn(2, 3, 5, 7)
    real = _recorded(gm, False, x)
    assert all(v is not None for k, v in real.items() if k != "output")
    calls = _count_calls(monkeypatch, net, ["fc", "tok", "gelu", "pool"])
    assert _recorded(gm, True, x) == real
    assert calls == {"fc": 0, "tok": 0, "gelu": 0, "pool": 1}  # the pool has no size rule: it ran


@pytest.mark.parametrize("how", ["hook", "pre_hook", "instance_forward", "global_hook"])
def test_shape_pass_runs_modules_whose_output_a_hook_or_instance_forward_may_change(how):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 6)).eval()
    fc = net[3]
    handle = None
    if how == "hook":
        handle = fc.register_forward_hook(lambda m, i, o: o[:, :2])
    elif how == "pre_hook":
        handle = fc.register_forward_pre_hook(lambda m, i: (i[0][:1],))
    elif how == "instance_forward":
        fc.forward = lambda x: nn.Linear.forward(fc, x)[:, :3]
    else:
        handle = nn.modules.module.register_module_forward_hook(
            lambda m, i, o: o[:, :2] if m is fc else None
        )
    try:
        gm = egp_fast.trace(net)
        x = torch.randn(2, 3, 6, 6)
        fast = _recorded(gm, True, x)
        assert fast == _recorded(gm, False, x)
        assert fast["_3"] != (2, 6)  # what the hook or the instance forward made of it
    finally:
        if handle is not None:
            handle.remove()


@pytest.mark.parametrize("bad", ["add", "iadd", "linear", "flatten"])
def test_shape_only_rules_leave_errors_to_the_real_call(bad):
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(5, 2)

        def forward(self, x):
            y = self.conv(x)  # [N, 4, 6, 6]
            if bad == "add":
                return y + y[:, :3]
            if bad == "iadd":
                y += y.sum(1, keepdim=True).expand(-1, 4, -1, -1).repeat(1, 1, 2, 1)
                return y
            if bad == "linear":
                return self.fc(y)
            return torch.flatten(y, 3, 1)

    net = Bad().eval()
    gm = egp_fast.trace(net)
    x = torch.randn(1, 3, 6, 6)
    with pytest.raises((RuntimeError, ValueError, IndexError)):
        with torch.no_grad():
            net(x)
    with pytest.raises(egp_fast.errors.DataError, match="example_inputs"):
        egp_fast.graph.propagate_shapes(net, gm, (x,), {})


@pytest.mark.parametrize(
    "name", ["resnet18", "mobilenet_v3_small", "densenet121", "shufflenet_v2_x0_5", "efficientnet_b0", "convnext_tiny"]
)
def test_shape_only_pass_matches_the_real_one_on_torchvision_models(name):
    from egp_fast.graph.shapes import _shapes_value_free

    torchvision = pytest.importorskip("torchvision")
    net = getattr(torchvision.models, name)(num_classes=10).eval()
    gm = egp_fast.trace(net)
    assert _shapes_value_free(gm)  # else both passes would run every layer
    x = torch.randn(1, 3, 64, 64)
    assert _recorded(gm, True, x) == _recorded(gm, False, x)
