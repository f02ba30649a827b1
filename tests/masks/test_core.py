import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn

import egp_fast
from egp_fast import _ext, masks


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


def _conv_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def _make_opt(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-2)
    if kind == "adam":
        return torch.optim.Adam(params, lr=0.05, weight_decay=1e-2)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=0.05, weight_decay=1e-2)
    if kind == "adamw_fused":  # what build_optimizer gives on CPU/CUDA
        return torch.optim.AdamW(params, lr=0.05, weight_decay=1e-2, fused=True)
    if kind == "sgd_subclass":  # not a known elementwise class: re-zeroed after every step

        class MySGD(torch.optim.SGD):
            pass

        return MySGD(params, lr=0.05, momentum=0.9, weight_decay=1e-2)
    raise AssertionError(kind)


def _steps(net, opt, n, gen, check=None):
    for _ in range(n):
        opt.zero_grad()
        x = torch.randn(8, 3, 6, 6, generator=gen)
        net(x).pow(2).mean().backward()
        if check is not None:
            check()
        opt.step()


def _extension_kernel():
    """The extension's CPU zero_pruned_ when the extension is built, else skip the test.

    With the extension loaded the masks must zero through it: a build where masks fell back to
    the bit mask (``_cpu_zero_kernel()`` returning None) fails here instead of skipping.
    """
    if not _ext.HAS_CPP:
        pytest.skip(f"the compiled extension is not built ({_ext.LOAD_ERROR})")
    kernel = torch.ops.egp_fast.zero_pruned_.default
    assert masks._ZERO_PRUNED is kernel, (
        f"egp_fast._C is loaded but the masks zero pruned entries with {masks._ZERO_PRUNED!r}, "
        "not the extension's zero_pruned_")
    return kernel


@pytest.fixture(params=["kernel", "bits"])
def zero_path(request, monkeypatch):
    """How pruned entries are zeroed on the CPU: the extension's zero_pruned_, or (a build
    without it) the cached int bit mask. The test must go through the path it names."""
    used = []
    if request.param == "bits":
        monkeypatch.setattr(masks, "_ZERO_PRUNED", None)

        class _Seen(dict):  # the bit-mask path looks up the int dtype of the tensor's width
            def get(self, key, default=None):
                used.append(key)
                return super().get(key, default)

        monkeypatch.setattr(masks, "_BITS", _Seen(masks._BITS))
    else:
        real = _extension_kernel()
        monkeypatch.setattr(masks, "_ZERO_PRUNED", lambda t, p: (used.append(t.shape), real(t, p))[1])
    yield request.param
    assert used, f"the {request.param} zeroing path was never used"


def test_cpu_zeroing_uses_the_kernel_and_keeps_no_int_mask(monkeypatch):
    real = _extension_kernel()
    calls = []
    monkeypatch.setattr(masks, "_ZERO_PRUNED", lambda t, p: (calls.append(t.shape), real(t, p)))
    net = _net()
    _prune_half(net)
    net(torch.randn(4, 6)).sum().backward()
    assert torch.Size(net[0].weight.shape) in calls  # the gradient hook went through the kernel
    assert (net[0].weight.grad[~net[0].weight_mask] == 0).all()
    assert not masks._guard_of(net[0])._bits  # no 4-byte-per-weight cache


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw", "adamw_fused", "sgd_subclass"])
def test_optimizer_with_state_from_before_pruning(kind, zero_path):
    # The README's step-by-step loop: the optimizer (and its momentum / Adam moments) exists
    # while the model trains dense; pruning comes later. The state of the newly pruned entries
    # is then nonzero and would revive them at the next step unless it is re-zeroed.
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    net = _conv_net()
    opt = _make_opt(kind, net.parameters())
    _steps(net, opt, 3, gen)
    names = ["0", "3", "7"]
    layers = [net.get_submodule(n) for n in names]
    assert all(opt.state[m.weight] for m in layers), "the optimizer has state before pruning"
    egp_fast.attach_masks(net, names)
    new = egp_fast.ops.select_smallest(
        [m.weight for m in layers], [m.weight_mask for m in layers], [m.weight.numel() // 2 for m in layers]
    )
    masks.set_masks(net, dict(zip(names, new)))
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

    _steps(net, opt, 6, gen, check=grads_zero)
    for m, p, b in zip(layers, pruned, before):
        assert (m.weight[p] == 0).all(), "a pruned weight moved"
        for v in opt.state[m.weight].values():
            if isinstance(v, torch.Tensor) and v.shape == m.weight.shape:
                assert (v[p] == 0).all(), "optimizer state of a pruned entry is nonzero"
        # kept weights did train: compared with the weights at pruning time
        assert (m.weight[~p] != b[~p]).float().mean() > 0.9


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw_fused"])
def test_nan_gradients_of_pruned_entries_do_not_leak(kind, zero_path):
    net = _net()
    _prune_half(net)
    pruned = ~net[0].weight_mask.clone()
    opt = _make_opt(kind, net.parameters())
    # NaN arrives in the pruned entries' gradient before it is accumulated into .grad
    net[0].weight.register_hook(lambda g: g.masked_fill(pruned, float("nan")))
    for _ in range(4):
        opt.zero_grad()
        net(torch.randn(16, 6)).pow(2).mean().backward()
        assert not net[0].weight.grad.isnan().any()
        opt.step()
    assert (net[0].weight[pruned] == 0).all()
    assert not net[0].weight.isnan().any()


def test_second_round_rezeroes_state_of_newly_pruned_entries():
    # Round 2 prunes more of a layer the optimizer has been training with masks on.
    net = _net()
    _prune_half(net)
    opt = _make_opt("sgd", net.parameters())
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(16, 6, generator=gen)).pow(2).mean().backward()
        opt.step()
    new = egp_fast.ops.select_smallest([net[0].weight], [net[0].weight_mask], [12])[0]
    masks.set_masks(net, {"0": new})
    pruned = ~new
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(16, 6, generator=gen)).pow(2).mean().backward()
        opt.step()
    assert (net[0].weight[pruned] == 0).all()
    assert (opt.state[net[0].weight]["momentum_buffer"][pruned] == 0).all()


def test_enforce_after_writing_weights_by_hand():
    net = _net()
    _prune_half(net)
    pruned = ~net[0].weight_mask.clone()
    opt = _make_opt("sgd", net.parameters())
    net(torch.randn(4, 6)).sum().backward()
    opt.step()
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        opt.state[net[0].weight]["momentum_buffer"].fill_(1.0)
    egp_fast.masks.enforce(net)
    assert (net[0].weight[pruned] == 0).all()
    opt.zero_grad()
    net(torch.randn(4, 6)).sum().backward()
    opt.step()
    assert (net[0].weight[pruned] == 0).all()
    assert (opt.state[net[0].weight]["momentum_buffer"][pruned] == 0).all()


def test_copies_mask_gradients_from_their_first_backward():
    net = _net()
    _prune_half(net)
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        pruned = ~clone[0].weight_mask
        clone(torch.randn(4, 6)).sum().backward()
        assert (clone[0].weight.grad[pruned] == 0).all()
        assert (clone[0].weight.grad[~pruned] != 0).any()
    # the original is unaffected by its copies
    net(torch.randn(4, 6)).sum().backward()
    assert (net[0].weight.grad[~net[0].weight_mask] == 0).all()


def test_no_forward_hooks_on_masked_layers():
    # Masks must not put Python into the forward pass (torch.compile would break the graph).
    net = _net()
    _prune_half(net)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())
