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


# ---- counting fused into nn.ReLU ---------------------------------------------------------


class _Twice(nn.Module):
    """An in-place ReLU used twice (two sites of one module), a plain ReLU, a ReLU subclass and
    a ReLU whose instance has its own forward (neither of the last two may be swapped)."""

    class MyReLU(nn.ReLU):
        pass

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.c3 = nn.Conv2d(6, 5, 1)
        self.c4 = nn.Conv2d(5, 5, 1)
        self.inpl = nn.ReLU(inplace=True)
        self.plain = nn.ReLU()
        self.sub = self.MyReLU()
        self.own = nn.ReLU()
        self.own.forward = lambda x: torch.relu(x)

    def forward(self, x):
        x = self.inpl(self.c1(x))
        x = self.inpl(self.c2(x))
        x = self.plain(self.c3(x))
        x = self.sub(self.c4(x))
        return self.own(x) + 1


def _stats_without_fusion(model, data, **kw):
    from egp_fast.measurement import counting

    orig = counting._Counter._relu_impl
    counting._Counter._relu_impl = lambda self, z: None
    try:
        return egp_fast.measure_entropy(model, data, progress=False, **kw)
    finally:
        counting._Counter._relu_impl = orig


@pytest.mark.parametrize("mode", ["exact", "paper"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_relu_counts_equal_the_hooks(mode, dtype, channels_last):
    torch.manual_seed(0)
    net = _Twice().to(dtype)
    data = [torch.randn(4, 3, 7, 9, dtype=dtype) for _ in range(3)]
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        data = [x.contiguous(memory_format=torch.channels_last) for x in data]
    swapped = {}

    def seen(mod, inp, name):
        swapped[name] = swapped.get(name, False) or "forward" in vars(mod)

    handles = [getattr(net, n).register_forward_pre_hook(lambda m, i, n=n: seen(m, i, n))
               for n in ("inpl", "plain", "sub")]
    fused = egp_fast.measure_entropy(net, data, progress=False, mode=mode)
    for h in handles:
        h.remove()
    plain = _stats_without_fusion(net, data, mode=mode)
    # the plain nn.ReLU modules ran swapped (the fused path was taken), the subclass did not
    assert swapped == {"inpl": True, "plain": True, "sub": False}
    assert set(fused.sites) == set(plain.sites) == {"inpl", "inpl:1", "plain", "sub", "own"}
    for name, s in fused.sites.items():
        t = plain.sites[name]
        assert torch.equal(s.on_counts, t.on_counts) and s.observations == t.observations, name
        assert s.samples == t.samples == 12
        assert s.entropy == t.entropy
    assert "forward" not in vars(net.inpl) and "forward" not in vars(net.plain)
    assert "forward" in vars(net.own)  # the model's own instance forward is left in place


def test_fused_relu_outputs_are_bit_identical_and_user_hooks_still_run():
    torch.manual_seed(1)
    net = _Twice()
    x = torch.randn(5, 3, 6, 6)
    x[0, :, 0, 0] = -0.0
    seen = []
    from egp_fast.measurement import cached_graph

    cached_graph(net, x)  # discovery first: the hooks below see the measurement pass only

    def pre(mod, inp):
        seen.append(["forward" in vars(mod), inp[0].clone()])

    def post(mod, inp, out):
        seen[-1].append(out.clone())

    h1 = net.plain.register_forward_pre_hook(pre)
    h2 = net.plain.register_forward_hook(post)
    try:
        egp_fast.measure_entropy(net, [x], progress=False)
    finally:
        h1.remove()
        h2.remove()
    assert len(seen) == 1
    swapped, z, out = seen[0]
    assert swapped  # the fused forward ran, between the user's pre-hook and forward hook
    assert torch.equal(out.view(torch.int32), torch.relu(z).view(torch.int32))


def test_fused_relu_forward_is_restored_when_the_pass_fails():
    net = _Twice()

    def batches():
        yield torch.randn(2, 3, 5, 5)
        raise RuntimeError("data loader broke")

    with pytest.raises(RuntimeError, match="data loader broke"):
        egp_fast.measure_entropy(net, batches(), progress=False)
    assert all("forward" not in vars(m) for m in (net.inpl, net.plain, net.sub))
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(net(x), net(x.clone()))


def test_fused_relu_needing_a_gradient_uses_the_reference():
    from egp_fast.measurement.counting import _Counter

    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    graph = egp_fast.discover_sites(net, torch.randn(2, 3))
    counter = _Counter(graph.sites, torch.device("cpu"), paper=False)
    counter.current_n = 2
    z = torch.randn(2, 4, requires_grad=True)
    y = counter.record_relu(0, z, False)
    y.sum().backward()
    assert torch.equal(z.grad, (z > 0).float())
    assert torch.equal(counter.first[0], (z > 0).sum(0))


@pytest.mark.requires_ext
def test_measurement_runs_the_fused_kernel(monkeypatch):
    """Under measure_entropy (eval, no_grad) each plain ReLU call goes through the fused kernel."""
    from egp_fast.ops import _dispatch

    calls = []
    real = _dispatch._IMPLS["relu_sign_count"]["cpp"]

    def spy(z, counts, channel_dim, inplace=False):
        calls.append(inplace)
        return real(z, counts, channel_dim, inplace)

    monkeypatch.setitem(_dispatch._IMPLS, "relu_sign_count", {**_dispatch._IMPLS["relu_sign_count"], "cpp": spy})
    net = _Twice()
    egp_fast.measure_entropy(net, [torch.randn(2, 3, 5, 5) for _ in range(2)], progress=False)
    assert calls == [True, True, False] * 2  # inpl (twice, in place), plain; the subclass is hooked
