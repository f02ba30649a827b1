"""depth_report: sites, longest path, weight layer calls, parameters, FLOPs and latency keys."""

from __future__ import annotations

import torch
from torch import nn

import egp_fast
from egp_fast.cli.models import BasicBlock
from egp_fast.folding import depth_report


def test_depth_report_latency_keys():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    rep = depth_report(net, torch.randn(3, 4), measure_latency=True)
    assert rep["sites"] == 1 and rep["longest_path"] == 2 and rep["params"] == 58
    assert rep["flops"] == 2 * 3 * (4 * 8 + 8 * 2)
    assert rep["latency_ms_b1"] > 0 and rep["latency_ms_b64"] > 0


def test_depth_report_longest_path_follows_the_deeper_branch():
    # BasicBlock: conv1 -> conv2 on one branch, the identity on the other: 2 on the longest path.
    rep = depth_report(BasicBlock(4, 4).eval(), torch.randn(1, 4, 6, 6), measure_latency=False)
    assert rep["longest_path"] == 2 and rep["weight_layers"] == 2 and rep["sites"] == 2
    assert "latency_ms_b1" not in rep and rep["nonzero_params"] <= rep["params"]


class _ClassToken(nn.Module):
    """A class token expanded and handed to a submodule (timm's CaiT and PiT do this): under
    no_grad, torch's FlopCounterMode rejects that view of a parameter."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, 8))
        self.fc, self.act, self.head = nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)

    def forward(self, x):
        x = torch.cat([self.fc(self.cls.expand(x.shape[0], -1, -1)), x], 1)
        return self.head(self.act(x))[:, 0]


def test_depth_report_counts_flops_of_a_model_the_counter_rejects_under_no_grad():
    net, x = _ClassToken().eval(), torch.randn(2, 5, 8)
    rep = depth_report(net, x)
    assert rep["flops"] == 2 * 2 * 1 * 8 * 8 + 2 * 2 * 6 * 8 * 2  # fc on the token, head on 6 positions
    out = egp_fast.collapse(net, egp_fast.measure_entropy(net, [x], progress=False), x, measure_latency=False)
    assert out.before["flops"] == rep["flops"]
