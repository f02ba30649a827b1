"""The masks' API (egp_fast/masks/core.py): state_dict round trips, strip_masks, enforce."""

import io

import pytest
import torch
from _mask_helpers import make_opt, net, prune_half

import egp_fast


def test_state_dict_round_trip_into_fresh_model():
    model = net()
    prune_half(model)
    sd = model.state_dict()
    assert "0.weight_mask" in sd and sd["0.weight_mask"].dtype == torch.bool
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd2 = torch.load(buf, weights_only=True)
    fresh = net()
    egp_fast.load_pruned_state_dict(fresh, sd2)
    assert torch.equal(fresh[0].weight_mask, model[0].weight_mask)
    assert torch.equal(fresh[0].weight, model[0].weight)
    assert egp_fast.sparsity(fresh) == pytest.approx(0.5)


def test_strip_masks_removes_buffers_and_hooks():
    model = net()
    prune_half(model)
    zeros = (model[0].weight == 0).sum()
    egp_fast.strip_masks(model)
    assert not egp_fast.masked_layers(model)
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert (model[0].weight == 0).sum() == zeros
    assert "0.weight_mask" not in model.state_dict()


def test_enforce_after_writing_weights_by_hand():
    model = net()
    prune_half(model)
    pruned = ~model[0].weight_mask.clone()
    opt = make_opt("sgd", model.parameters())
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        opt.state[model[0].weight]["momentum_buffer"].fill_(1.0)
    egp_fast.masks.enforce(model)
    assert (model[0].weight[pruned] == 0).all()
    opt.zero_grad()
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    assert (model[0].weight[pruned] == 0).all()
    assert (opt.state[model[0].weight]["momentum_buffer"][pruned] == 0).all()
