"""depth_report: sites, longest path, weight layer calls, parameters, FLOPs and latency keys."""

from __future__ import annotations

import torch
from torch import nn

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
