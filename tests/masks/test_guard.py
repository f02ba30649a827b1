"""The per-layer guard (egp_fast/masks/guard.py): pruned gradients zeroed as autograd writes
them, through the extension's kernel or the bit mask, in copies too, with no forward hooks."""

import copy
import pickle

import pytest
import torch
from _mask_helpers import extension_kernel, make_opt, net, prune_half

from egp_fast.masks import guard


def test_cpu_zeroing_uses_the_kernel_and_keeps_no_int_mask(monkeypatch):
    real = extension_kernel()
    calls = []
    monkeypatch.setattr(guard, "_ZERO_PRUNED", lambda t, p: (calls.append(t.shape), real(t, p)))
    model = net()
    prune_half(model)
    model(torch.randn(4, 6)).sum().backward()
    assert torch.Size(model[0].weight.shape) in calls  # the gradient hook went through the kernel
    assert (model[0].weight.grad[~model[0].weight_mask] == 0).all()
    assert not guard._guard_of(model[0])._bits  # no 4-byte-per-weight cache


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw_fused"])
def test_nan_gradients_of_pruned_entries_do_not_leak(kind, zero_path):
    model = net()
    prune_half(model)
    pruned = ~model[0].weight_mask.clone()
    opt = make_opt(kind, model.parameters())
    # NaN arrives in the pruned entries' gradient before it is accumulated into .grad
    model[0].weight.register_hook(lambda g: g.masked_fill(pruned, float("nan")))
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(16, 6)).pow(2).mean().backward()
        assert not model[0].weight.grad.isnan().any()
        opt.step()
    assert (model[0].weight[pruned] == 0).all()
    assert not model[0].weight.isnan().any()


def test_deepcopy_and_pickle_keep_enforcement():
    model = net()
    prune_half(model)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        pruned = ~clone[0].weight_mask
        o = torch.optim.SGD(clone.parameters(), lr=0.5, momentum=0.9)
        for _ in range(3):
            o.zero_grad()
            clone(torch.randn(4, 6)).sum().backward()
            o.step()
        assert (clone[0].weight[pruned] == 0).all()


def test_copies_mask_gradients_from_their_first_backward():
    model = net()
    prune_half(model)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        pruned = ~clone[0].weight_mask
        clone(torch.randn(4, 6)).sum().backward()
        assert (clone[0].weight.grad[pruned] == 0).all()
        assert (clone[0].weight.grad[~pruned] != 0).any()
    # the original is unaffected by its copies
    model(torch.randn(4, 6)).sum().backward()
    assert (model[0].weight.grad[~model[0].weight_mask] == 0).all()


def test_no_forward_hooks_on_masked_layers():
    # Masks must not put Python into the forward pass (torch.compile would break the graph).
    model = net()
    prune_half(model)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
