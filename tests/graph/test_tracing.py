"""torch.fx tracing (egp_fast/graph/tracer.py, tracing.py): leaves, modules called but not installed."""

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
