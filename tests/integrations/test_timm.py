"""timm models through the whole pipeline: site discovery, one EGP round, collapse.

Four families, each at random weights (``pretrained=False``) on 32x32 inputs so every test
takes seconds: ResNet (``resnet10t``: the deep stem and the BasicBlock), ConvNeXt
(``convnext_atto``: GELU MLPs of 1x1 convs, layer scale), ViT (``vit_tiny_patch16_224`` at
``img_size=32``, patch 8, 2 blocks: token features, channel axis last) and EfficientNet
(``efficientnet_b0``: depthwise convs, squeeze-excite, SiLU).

Collapse is tested by forcing one site to zero entropy: the bias that feeds it is raised by
100, so every channel of that site is ON on the data (an identity), and the collapsed model
must give the same outputs with one site fewer.
"""

from __future__ import annotations

import copy

import pytest
import torch

import egp_fast

timm = pytest.importorskip("timm")

# name -> (timm kwargs, expected sites, {site: (producers, channel_dim, channels)},
#          the site forced to zero entropy, the parameter whose raise makes it always ON)
FAMILIES = {
    "resnet10t": (
        # timm zero-initialises each block's last BN scale, which makes every residual branch a
        # constant that collapse would (rightly) remove too; keep the branches live here.
        {"zero_init_last": False},
        11,
        {
            "conv1.2": (["conv1.0"], 1, 24),
            "act1": (["conv1.6"], 1, 64),
            "layer1.0.act1": (["layer1.0.conv1"], 1, 64),
            # after the residual add: the producer is the block's last conv, not the shortcut
            "layer2.0.act2": (["layer2.0.conv2"], 1, 128),
            "layer4.0.act2": (["layer4.0.conv2"], 1, 512),
        },
        "layer1.0.act1",
        "layer1.0.bn1.bias",
    ),
    "convnext_atto": (
        {},
        12,
        {
            "stages.0.blocks.0.mlp.act": (["stages.0.blocks.0.mlp.fc1"], 1, 160),
            "stages.2.blocks.5.mlp.act": (["stages.2.blocks.5.mlp.fc1"], 1, 640),
            "stages.3.blocks.1.mlp.act": (["stages.3.blocks.1.mlp.fc1"], 1, 1280),
        },
        "stages.1.blocks.0.mlp.act",
        "stages.1.blocks.0.mlp.fc1.bias",
    ),
    "vit_tiny_patch16_224": (
        {"img_size": 32, "patch_size": 8, "depth": 2},
        2,
        {
            # [N, tokens, C] features: the channel axis is the last one
            "blocks.0.mlp.act": (["blocks.0.mlp.fc1"], -1, 768),
            "blocks.1.mlp.act": (["blocks.1.mlp.fc1"], -1, 768),
        },
        "blocks.0.mlp.act",
        "blocks.0.mlp.fc1.bias",
    ),
    "efficientnet_b0": (
        {},
        49,
        {
            "bn1.act": (["conv_stem"], 1, 32),
            "blocks.0.0.bn1.act": (["blocks.0.0.conv_dw"], 1, 32),
            "blocks.0.0.se.act1": (["blocks.0.0.se.conv_reduce"], 1, 8),
            "blocks.1.0.bn1.act": (["blocks.1.0.conv_pw"], 1, 96),
            "bn2.act": (["conv_head"], 1, 1280),
        },
        "blocks.1.0.bn1.act",
        "blocks.1.0.bn1.bias",
    ),
}
NAMES = list(FAMILIES)


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, **FAMILIES[name][0]).eval()


def _data(n_batches: int = 2, batch: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(n_batches)]


@pytest.mark.parametrize("name", NAMES)
def test_site_discovery(name):
    _, n_sites, expected, _, _ = FAMILIES[name]
    model = _model(name)
    x = _data(1)[0]
    graph = egp_fast.discover_sites(model, x)
    assert graph.traced
    assert len(graph.sites) == n_sites
    by_name = {s.name: s for s in graph.sites}
    assert len(by_name) == n_sites, "site names must be unique"
    modules = dict(model.named_modules())
    for site, (producers, channel_dim, channels) in expected.items():
        s = by_name[site]
        assert s.producers == producers, site
        assert s.channel_dim == channel_dim, site
        assert s.channels == channels, site
        assert s.shape[channel_dim] == channels, site
    for s in graph.sites:
        assert s.producers, f"{s.name} has no producer"
        for p in s.producers:  # producers are real weight layers of the model
            assert isinstance(modules[p], (torch.nn.Conv2d, torch.nn.Linear)), (s.name, p)
    table = egp_fast.inspect(model, x, file=False)
    for site, (producers, _, channels) in expected.items():
        line = next(ln for ln in table.splitlines() if f" {site} " in ln)
        assert producers[0] in line and str(channels) in line


@pytest.mark.parametrize("name", NAMES)
def test_one_egp_round(name):
    model = _model(name)
    data = _data()
    pruner = egp_fast.Pruner(model, data[0], step=0.5, method="egp", progress=False)
    graph = egp_fast.discover_sites(model, data[0])
    # EGP prunes the producers of the sites and nothing else
    assert set(pruner.prunable) == set(graph.producer_layers())
    stats = pruner.measure(data)
    assert set(stats.sites) == {s.name for s in graph.sites}
    plan = pruner.plan(stats)
    modules = dict(model.named_modules())
    before = {n: int((modules[n].weight != 0).sum()) for n in pruner.prunable}
    pruner.apply(plan)
    total = sum(modules[n].weight.numel() for n in pruner.prunable)
    zeros = sum(int((modules[n].weight == 0).sum()) for n in pruner.prunable)
    # half of the prunable weights, up to the per-layer rounding down of the allocation
    assert total / 2 - len(pruner.prunable) <= zeros <= total / 2
    assert pruner.sparsity() == pytest.approx(zeros / total)
    for n, k in plan.items():  # exactly the planned number per layer
        assert before[n] - int((modules[n].weight != 0).sum()) == k, n
    # the masks hold through a training step, and the pruned model still runs
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    model(data[0]).square().mean().backward()
    opt.step()
    model.eval()
    assert sum(int((modules[n].weight == 0).sum()) for n in pruner.prunable) >= zeros
    assert torch.isfinite(model(data[1])).all()


@pytest.mark.parametrize("name", NAMES)
def test_collapse_forced_site(name):
    _, n_sites, _, site, param = FAMILIES[name]
    model = _model(name)
    with torch.no_grad():
        model.get_parameter(param).add_(100.0)
    data = _data()
    stats = egp_fast.measure_entropy(model, data, progress=False)
    assert stats.sites[site].collapsible, f"{site} should be at zero entropy after raising {param}"
    original = copy.deepcopy(model)
    # 16 random images are weak evidence (flip bound ~17%): accept it explicitly, this is a test.
    # Only the forced site: on 16 random images some small sites (EfficientNet's squeeze-excite,
    # one position per image) are at zero entropy too, and a SiLU near 0 is not linear.
    out = egp_fast.collapse(model, stats, data[0], exact=True, measure_latency=False, max_flip=1.0,
                            sites=[site])
    assert out.removed_sites == [site]
    entry = next(e for e in out.removed if e["kind"] == "linearize")
    assert entry["identity"] == stats.sites[site].p_on.numel()  # every channel always ON
    assert entry["exact"]  # GELU/SiLU too: at +100 the replacement matched them to float rounding
    assert out.after["sites"] == n_sites - 1
    assert out.before["sites"] == n_sites
    for p, q in zip(model.parameters(), original.parameters()):  # the input model is untouched
        assert torch.equal(p, q)
    with torch.no_grad():
        ref, got = original(data[1]), out.model(data[1])
    rel = float((ref - got).abs().max() / ref.abs().max())
    # ReLU folds are exact; the GELU/SiLU of a +100 input equals its input in float32. Folding
    # every batch norm in float32 rounds (EfficientNet-B0: 49 of them, 1.1e-4 on this random net)
    assert rel < 3e-4, rel
    assert out.relative_deviation < 1e-4


@pytest.mark.parametrize("name", ["regnety_002", "efficientnet_b0"])
def test_batchnormact_layers_fold_into_their_convs(name):
    # timm's BatchNormAct2d calls F.batch_norm itself (fx traces through it) behind a rank assert
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    for m in model.modules():  # non-trivial statistics, so a fold that forgot them would show
        if isinstance(m, BatchNormAct2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 32, 32)
    stats = egp_fast.measure_entropy(model, [x], progress=False)
    out = egp_fast.collapse(model, stats, x, sites=[], measure_latency=False)
    n_bn = sum(isinstance(m, BatchNormAct2d) for m in model.modules())
    assert sum(e["kind"] == "bn_fold" for e in out.removed) == n_bn
    assert not any(n.target is torch.nn.functional.batch_norm for n in out.model.graph.nodes)
    assert out.relative_deviation <= 1e-5
    with torch.no_grad():
        x2 = torch.randn(3, 3, 32, 32)
        ref, got = model(x2), out.model(x2)
    assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
