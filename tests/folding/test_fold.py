"""The folding passes on one layer at a time (dead branches), and fold-then-finetune: the
collapsed model is an ordinary trainable module.

After ``collapse(..., exact=False, fold="always")`` the folded architecture is what gets
trained (issue 12 §2): its weights are its own ``nn.Parameter`` objects, ``train()``/``eval()``
behave, it deep-copies, moves between devices/dtypes, and round-trips through ``state_dict``.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from _collapse_helpers import ViTBlock, kinds, rel, remove_sites, stats_of
from torch import nn

import egp_fast
from egp_fast.cli.models import BasicBlock, cifar_resnet18
from egp_fast.folding import collapse


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    ).eval()


def _collapsed(net, x, sites):
    stats = egp_fast.measure_entropy(net, [x], progress=False)
    remove_sites(net, stats, sites)  # EASIER: these ReLUs become the identity
    out = egp_fast.collapse(net, stats, x, exact=False, fold="always", measure_latency=False, sites=[])
    return out


def _toy_task(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = (x[:, 0].mean(dim=(1, 2)) > 0).long()  # learnable by the folded conv net
    return x, y


def test_collapsed_model_trains_its_own_parameters():
    net = _conv_net()
    x, y = _toy_task()
    out = _collapsed(net, x[:4], ["2"])
    assert "compose_conv" in [e["kind"] for e in out.removed]
    model = out.model
    params = dict(model.named_parameters())
    assert params and all(isinstance(p, nn.Parameter) and p.requires_grad for p in params.values())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # folded (see docs)
    before = {k: v.detach().clone() for k, v in params.items()}
    original = {k: v.detach().clone() for k, v in net.state_dict().items()}
    model.train()
    assert model.training
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with torch.no_grad():
        loss0 = float(F.cross_entropy(model(x), y))
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    assert not model.training
    with torch.no_grad():
        loss1 = float(F.cross_entropy(model(x), y))
    assert loss1 < 0.8 * loss0
    changed = [k for k, v in model.named_parameters() if not torch.equal(v.detach(), before[k])]
    assert set(changed) == set(params)  # every folded weight trained, none is a frozen constant
    # The model collapse was given is untouched.
    assert all(torch.equal(original[k], v) for k, v in net.state_dict().items())


def test_unfoldable_batchnorm_follows_train_and_eval():
    torch.manual_seed(0)
    # BatchNorm right on the input has no conv before it: it stays, and behaves like one.
    net = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(4, 3, 5, 5) + 2.0
    out = _collapsed(net, x, ["2"])
    model = out.model
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 1
    mean0 = bns[0].running_mean.clone()
    with torch.no_grad():
        model.eval()
        model(x)
        assert torch.equal(bns[0].running_mean, mean0)
        model.train()
        model(x)
    assert not torch.equal(bns[0].running_mean, mean0)  # batch statistics in train mode


def test_collapsed_model_copies_moves_and_round_trips_state_dict():
    net = cifar_resnet18(10, width=8).eval()
    x = torch.randn(2, 3, 16, 16)
    out = _collapsed(net, x, ["layer1.0.relu1", "layer2.1.relu1", "layer2.1.relu2"])
    model = out.model
    with torch.no_grad():
        y = model(x)
    twin = copy.deepcopy(model)
    assert all(a is not b for a, b in zip(twin.parameters(), model.parameters()))
    with torch.no_grad():
        assert torch.equal(twin(x), y)
        next(twin.parameters()).add_(1.0)
        assert torch.equal(model(x), y)  # the copy is independent
    # state_dict: save, load with weights_only=True into another copy, same outputs.
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    twin.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        assert torch.equal(twin(x), y)
    # The whole module pickles too (it is an fx.GraphModule).
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    with torch.no_grad():
        assert torch.equal(torch.load(buf, weights_only=False)(x), y)
    # .to(dtype/device) moves every parameter and buffer.
    m64 = copy.deepcopy(model).to(torch.float64)
    assert all(t.dtype == torch.float64 for t in list(m64.parameters()) + list(m64.buffers()) if t.is_floating_point())
    with torch.no_grad():
        assert torch.allclose(m64(x.double()).float(), y, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_collapsed_model_moves_to_cuda():
    net = _conv_net()
    x = torch.randn(2, 3, 8, 8)
    model = _collapsed(net, x, ["2"]).model
    with torch.no_grad():
        y = model(x)
        assert torch.allclose(model.to("cuda")(x.cuda()).cpu(), y, atol=1e-4)


def test_folded_transformer_mlp_trains():
    torch.manual_seed(0)
    net = nn.Sequential(ViTBlock(16, 64), nn.Linear(16, 2))
    x = torch.randn(32, 5, 16)
    target = torch.randn(32, 5, 2)
    stats = egp_fast.measure_entropy(net, [x], progress=False)
    remove_sites(net, stats, ["0.act"])
    out = egp_fast.collapse(net, stats, x, measure_latency=False, sites=[])
    assert out.exact and "compose_linear" in [e["kind"] for e in out.removed]
    model = out.model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.no_grad():
        loss0 = float(F.mse_loss(model(x), target))
    for _ in range(40):
        opt.zero_grad()
        F.mse_loss(model(x), target).backward()
        opt.step()
    with torch.no_grad():
        assert float(F.mse_loss(model(x), target)) < 0.9 * loss0


# ---------------------------------------------------------------------------- dead branches


def test_dead_branch_all_off():
    block = BasicBlock(4, 4)
    block.eval()
    with torch.no_grad():
        block.bn1.bias.fill_(-100.0)
    x = torch.randn(3, 4, 4, 4)
    out = collapse(block, stats_of(block, x), x, measure_latency=False, max_flip=1.0)
    assert "dead_branch" in kinds(out)
    assert out.after["weight_layers"] == 0 and out.after["longest_path"] == 0
    assert rel(block(x), out.model(x)) < 1e-5


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("exact", [True, False])
def test_tiny_feature_maps_constant_branch_trap(size, exact):
    # conv1 pruned to 100%: the site sees the BN shift, a per-channel constant, some channels ON.
    # The next conv is zero-padded: its output depends on the position, not a per-channel bias.
    block = BasicBlock(4, 4)
    block.eval()
    with torch.no_grad():
        block.conv1.weight.zero_()
        block.bn1.bias.copy_(torch.tensor([1.5, -1.0, 0.7, -0.3]))
        block.bn2.running_var.fill_(1.0)
    x = torch.randn(3, 4, size, size)
    st = stats_of(block, x)
    assert st.sites["relu1"].collapsible
    out = collapse(block, st, x, exact=exact, fold="always", measure_latency=False, max_flip=1.0)
    assert out.after["sites"] == 1
    if exact:
        assert rel(block(x), out.model(x)) < 1e-5
        assert "dead_branch" not in kinds(out)
    else:
        assert out.max_deviation == pytest.approx(float((block(x) - out.model(x)).abs().max()), rel=1e-4, abs=1e-6)
