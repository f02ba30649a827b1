import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn

import egp_fast
from egp_fast import masks


def _net():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _prune_half(net):
    egp_fast.attach_masks(net, ["0", "2"])
    new = egp_fast.ops.select_smallest(
        [net[0].weight, net[2].weight], [net[0].weight_mask, net[2].weight_mask], [24, 12]
    )
    masks.set_masks(net, {"0": new[0], "2": new[1]})


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_masks_survive_20_steps_with_momentum_and_weight_decay(opt):
    net = _net()
    _prune_half(net)
    pruned = [~net[0].weight_mask.clone(), ~net[2].weight_mask.clone()]
    if opt == "sgd":
        o = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    else:
        o = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=1e-2)
    for _ in range(20):
        o.zero_grad()
        net(torch.randn(16, 6)).pow(2).mean().backward()
        assert (net[0].weight.grad[pruned[0]] == 0).all()
        o.step()
        assert (net[0].weight[pruned[0]] == 0).all() and (net[2].weight[pruned[1]] == 0).all()
    # kept weights did train
    assert (net[0].weight[~pruned[0]] != 0).all()


def test_state_dict_round_trip_into_fresh_model():
    net = _net()
    _prune_half(net)
    sd = net.state_dict()
    assert "0.weight_mask" in sd and sd["0.weight_mask"].dtype == torch.bool
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd2 = torch.load(buf, weights_only=True)
    fresh = _net()
    egp_fast.load_pruned_state_dict(fresh, sd2)
    assert torch.equal(fresh[0].weight_mask, net[0].weight_mask)
    assert torch.equal(fresh[0].weight, net[0].weight)
    assert egp_fast.sparsity(fresh) == pytest.approx(0.5)


def test_deepcopy_and_pickle_keep_enforcement():
    net = _net()
    _prune_half(net)
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        pruned = ~clone[0].weight_mask
        o = torch.optim.SGD(clone.parameters(), lr=0.5, momentum=0.9)
        for _ in range(3):
            o.zero_grad()
            clone(torch.randn(4, 6)).sum().backward()
            o.step()
        assert (clone[0].weight[pruned] == 0).all()


def test_strip_masks_removes_buffers_and_hooks():
    net = _net()
    _prune_half(net)
    zeros = (net[0].weight == 0).sum()
    egp_fast.strip_masks(net)
    assert not egp_fast.masked_layers(net)
    assert all(not m._forward_pre_hooks for m in net.modules())
    assert (net[0].weight == 0).sum() == zeros
    assert "0.weight_mask" not in net.state_dict()
