"""The optimizer step hooks (egp_fast/masks/optim.py): pruned weights and their optimizer state
(momentum, Adam moments) stay at zero through training, whenever the optimizer was made."""

import pytest
import torch
import torch.nn as nn
from _mask_helpers import make_opt, net, prune_half

import egp_fast
from egp_fast import masks


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_masks_survive_20_steps_with_momentum_and_weight_decay(opt):
    model = net()
    prune_half(model)
    pruned = [~model[0].weight_mask.clone(), ~model[2].weight_mask.clone()]
    if opt == "sgd":
        o = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    else:
        o = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=1e-2)
    for _ in range(20):
        o.zero_grad()
        model(torch.randn(16, 6)).pow(2).mean().backward()
        assert (model[0].weight.grad[pruned[0]] == 0).all()
        o.step()
        assert (model[0].weight[pruned[0]] == 0).all() and (model[2].weight[pruned[1]] == 0).all()
    # kept weights did train
    assert (model[0].weight[~pruned[0]] != 0).all()


def _conv_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def _steps(model, opt, n, gen, check=None):
    for _ in range(n):
        opt.zero_grad()
        x = torch.randn(8, 3, 6, 6, generator=gen)
        model(x).pow(2).mean().backward()
        if check is not None:
            check()
        opt.step()


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw", "adamw_fused", "sgd_subclass"])
def test_optimizer_with_state_from_before_pruning(kind, zero_path):
    # The README's step-by-step loop: the optimizer (and its momentum / Adam moments) exists
    # while the model trains dense; pruning comes later. The state of the newly pruned entries
    # is then nonzero and would revive them at the next step unless it is re-zeroed.
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = _conv_net()
    opt = make_opt(kind, model.parameters())
    _steps(model, opt, 3, gen)
    names = ["0", "3", "7"]
    layers = [model.get_submodule(n) for n in names]
    assert all(opt.state[m.weight] for m in layers), "the optimizer has state before pruning"
    egp_fast.attach_masks(model, names)
    new = egp_fast.ops.select_smallest(
        [m.weight for m in layers], [m.weight_mask for m in layers], [m.weight.numel() // 2 for m in layers]
    )
    masks.set_masks(model, dict(zip(names, new)))
    pruned = [~m.weight_mask.clone() for m in layers]
    before = [m.weight.detach().clone() for m in layers]
    # the state of the pruned entries is still nonzero here (nothing touched the optimizer yet)
    assert any(
        bool((v[p] != 0).any())
        for m, p in zip(layers, pruned)
        for v in opt.state[m.weight].values()
        if isinstance(v, torch.Tensor) and v.shape == m.weight.shape
    )

    def grads_zero():
        for m, p in zip(layers, pruned):
            assert (m.weight.grad[p] == 0).all()

    _steps(model, opt, 6, gen, check=grads_zero)
    for m, p, b in zip(layers, pruned, before):
        assert (m.weight[p] == 0).all(), "a pruned weight moved"
        for v in opt.state[m.weight].values():
            if isinstance(v, torch.Tensor) and v.shape == m.weight.shape:
                assert (v[p] == 0).all(), "optimizer state of a pruned entry is nonzero"
        # kept weights did train: compared with the weights at pruning time
        assert (m.weight[~p] != b[~p]).float().mean() > 0.9


def test_second_round_rezeroes_state_of_newly_pruned_entries():
    # Round 2 prunes more of a layer the optimizer has been training with masks on.
    model = net()
    prune_half(model)
    opt = make_opt("sgd", model.parameters())
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, 6, generator=gen)).pow(2).mean().backward()
        opt.step()
    new = egp_fast.ops.select_smallest([model[0].weight], [model[0].weight_mask], [12])[0]
    masks.set_masks(model, {"0": new})
    pruned = ~new
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, 6, generator=gen)).pow(2).mean().backward()
        opt.step()
    assert (model[0].weight[pruned] == 0).all()
    assert (opt.state[model[0].weight]["momentum_buffer"][pruned] == 0).all()
