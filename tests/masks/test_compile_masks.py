"""Masked models under torch.compile: no graph breaks caused by egp_fast, masks hold in training.

Before, every masked layer carried a forward pre-hook and dynamo broke the graph at each one
(20 breaks on the digits ResNet). Mask enforcement now lives on the weights' gradients and in
the optimizer step hooks, outside the traced forward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from _models import ResidualBlock

import egp_fast
from egp_fast import masks
dynamo = pytest.importorskip("torch._dynamo")


def _conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), ResidualBlock(8), ResidualBlock(8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 32), nn.GELU(), nn.Linear(32, 16), nn.ReLU(),
                         nn.Linear(16, 5))


def _prune(net: nn.Module, fraction: float = 0.5) -> dict[str, torch.Tensor]:
    names = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    egp_fast.attach_masks(net, names)
    mods = [net.get_submodule(n) for n in names]
    new = egp_fast.ops.select_smallest(
        [m.weight for m in mods], [m.weight_mask for m in mods], [int(m.weight.numel() * fraction) for m in mods]
    )
    masks.set_masks(net, dict(zip(names, new)))
    return {n: ~m.clone() for n, m in zip(names, new)}


def _breaks(model: nn.Module, x: torch.Tensor) -> int:
    dynamo.reset()
    return dynamo.explain(model)(x).graph_break_count


@pytest.mark.parametrize("make", [_conv_net, _mlp], ids=["convnet", "mlp"])
def test_masked_model_has_no_extra_graph_breaks(make):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6)
    plain = make()
    masked = make()
    masked.load_state_dict(plain.state_dict())
    _prune(masked)
    assert _breaks(masked, x) == _breaks(plain, x) == 0


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_masks_hold_through_compiled_training_steps(opt):
    torch.manual_seed(0)
    net = _conv_net()
    # optimizer state from dense training first, as in the README's loop
    o = (torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2) if opt == "sgd"
         else torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=1e-2))
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        o.zero_grad()
        net(torch.randn(4, 3, 6, 6, generator=g)).pow(2).mean().backward()
        o.step()
    pruned = _prune(net)
    before = {n: net.get_submodule(n).weight.detach().clone() for n in pruned}
    dynamo.reset()
    # aot_eager: the forward and backward graphs are traced and compiled by AOTAutograd as in
    # inductor, without paying for C++ code generation on a 2-core test machine.
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    for _ in range(4):
        o.zero_grad()
        compiled(torch.randn(4, 3, 6, 6, generator=g)).pow(2).mean().backward()
        for n, p in pruned.items():
            assert (net.get_submodule(n).weight.grad[p] == 0).all(), n
        o.step()
    for n, p in pruned.items():
        w = net.get_submodule(n).weight
        assert (w[p] == 0).all(), f"pruned weights of {n} moved under torch.compile"
        assert (w[~p] != before[n][~p]).any(), f"kept weights of {n} did not train"
        for v in o.state[w].values():
            if isinstance(v, torch.Tensor) and v.shape == w.shape:
                assert (v[p] == 0).all(), f"optimizer state of pruned entries of {n}"


@pytest.mark.slow
def test_masks_hold_under_inductor():
    torch.manual_seed(0)
    net = _mlp()
    pruned = _prune(net)
    o = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    dynamo.reset()
    compiled = torch.compile(net)
    for _ in range(3):
        o.zero_grad()
        compiled(torch.randn(8, 3, 6, 6)).pow(2).mean().backward()
        o.step()
    for n, p in pruned.items():
        assert (net.get_submodule(n).weight[p] == 0).all()
