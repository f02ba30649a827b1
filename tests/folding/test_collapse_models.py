"""Collapse on torchvision models (random init) after forcing chosen sites to zero entropy.

Forcing: the bias right before a site is shifted far above (always ON / saturated) or below
(always OFF) the pre-activations seen on the data (see ``_collapse_helpers.force``); the
statistics are then measured with ``measure_entropy`` on that data, as a user would.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from _collapse_helpers import force, remove_sites

from egp_fast.folding import collapse
from egp_fast.cli.models import cifar_resnet18
from egp_fast.measurement import measure_entropy

# model builder, input shape, [(site, +1 ON / -1 OFF)]
CASES = {
    "resnet18": (
        lambda: torchvision.models.resnet18(num_classes=10),
        (2, 3, 32, 32),
        [("layer1.0.relu", 1), ("layer2.1.relu", -1), ("layer3.0.relu", 1)],
    ),
    "resnet50": (
        lambda: torchvision.models.resnet50(num_classes=10),
        (1, 3, 32, 32),
        [("layer1.0.relu", 1), ("layer1.0.relu:1", 1), ("layer3.0.relu:1", -1), ("layer4.2.relu", 1)],
    ),
    "mobilenet_v2": (
        lambda: torchvision.models.mobilenet_v2(num_classes=10),
        (2, 3, 32, 32),
        [("features.1.conv.0.2", 1), ("features.9.conv.1.2", -1), ("features.15.conv.0.2", 1),
         ("features.15.conv.1.2", 1)],
    ),
    "vgg11_bn": (
        lambda: torchvision.models.vgg11_bn(num_classes=10),
        (2, 3, 32, 32),
        [("features.6", 1), ("features.20", -1), ("classifier.4", 1)],
    ),
    "swin_t": (
        lambda: torchvision.models.swin_t(num_classes=10),
        (1, 3, 32, 32),
        [("features.1.1.mlp.1", 1), ("features.5.2.mlp.1", -1), ("features.7.0.mlp.1", 1)],
    ),
    "vit_b_16": (
        lambda: torchvision.models.vit_b_16(num_classes=10, image_size=32),
        (2, 3, 32, 32),
        [("encoder.layers.encoder_layer_1.mlp.1", 1), ("encoder.layers.encoder_layer_6.mlp.1", -1),
         ("encoder.layers.encoder_layer_10.mlp.1", 1)],
    ),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / float(a.abs().max())


@pytest.mark.parametrize("name", list(CASES))
def test_exact_collapse_torchvision(name):
    build, shape, plan = CASES[name]
    model = build().eval()
    if name == "vit_b_16":
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # zero-initialised by torchvision
    x = torch.randn(*shape)
    force(model, x, plan)
    stats = measure_entropy(model, [x], progress=False)
    forced = [s for s, _ in plan]
    assert set(forced) <= set(stats.zero_entropy_sites())
    out = collapse(model, stats, x, exact=True, fold="always", measure_latency=False, max_flip=1.0, sites=forced)
    assert sorted(out.removed_sites) == sorted(forced)
    dead = [e["site"] for e in out.removed if e["kind"] == "dead_code"]
    assert not set(dead) & set(forced)
    assert out.after["sites"] == out.before["sites"] - len(forced) - len(dead)
    assert out.after["longest_path"] <= out.before["longest_path"]
    # Every merge is exact; GELU sites are flagged approximate, but forced far from 0 they are
    # numerically linear, so the bar holds for the transformers too.
    assert all(e["exact"] for e in out.removed if e["kind"] != "linearize")
    with torch.no_grad():
        y, z = model(x), out.model(x)
    assert _rel(y, z) <= 1e-4
    assert out.relative_deviation <= 1e-4
    # A fresh input (not the one the deviation was measured on) obeys the same bar.
    x2 = torch.randn(*shape) * 0.5
    with torch.no_grad():
        stats2 = measure_entropy(model, [x2], progress=False)
        if set(forced) <= set(stats2.zero_entropy_sites()):
            assert _rel(model(x2), out.model(x2)) <= 1e-4
    if name in ("swin_t", "vit_b_16"):
        # forced far from 0, the GELUs matched their identity to float rounding: exact
        assert out.exact and all(e["exact"] for e in out.removed)
        assert "compose_linear" in [e["kind"] for e in out.removed]


@pytest.mark.parametrize("k", [2, 4])
def test_cifar_resnet18_inexact_collapse_is_shallower(k):
    torch.manual_seed(0)
    model = cifar_resnet18(10, width=16).eval()
    x = torch.randn(4, 3, 16, 16)
    picks = ["layer1.0.relu1", "layer2.0.relu1", "layer3.1.relu1", "layer4.0.relu1"][:k]
    force(model, x, [(s, 1 if i % 2 == 0 else -1) for i, s in enumerate(picks)])
    stats = measure_entropy(model, [x], progress=False)
    out = collapse(model, stats, x, exact=False, fold="always", measure_latency=False, max_flip=1.0, sites=picks)
    assert out.before["sites"] == 17 and out.after["sites"] == 17 - k
    assert out.after["longest_path"] < out.before["longest_path"]
    assert out.after["weight_layers"] < out.before["weight_layers"]
    kinds = [e["kind"] for e in out.removed]
    assert "compose_conv" in kinds and "dead_branch" in kinds
    with torch.no_grad():
        dev = float((model(x) - out.model(x)).abs().max())
    assert out.max_deviation == pytest.approx(dev, rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------------------- EASIER: removed sites fold


def test_cifar_resnet18_all_relus_identity_folds():
    # EASIER's end state on the digits ResNet: every ReLU replaced by the identity.
    torch.manual_seed(0)
    model = cifar_resnet18(10, width=16).eval()
    x = torch.randn(2, 3, 16, 16)
    stats = measure_entropy(model, [x], progress=False)
    assert len(stats.sites) == 17
    remove_sites(model, stats, list(stats.sites))
    with torch.no_grad():
        y = model(x)
    ex = collapse(model, stats, x, exact=True, measure_latency=False, sites=[])
    assert ex.exact and ex.after["sites"] == 0 and ex.relative_deviation <= 1e-4
    assert len(ex.removed_sites) == 17
    assert "compose_conv" not in [e["kind"] for e in ex.removed]  # every 3x3 pair is zero-padded
    auto = collapse(model, stats, x, exact=False, fold="auto", measure_latency=False, sites=[])
    assert auto.after["flops"] <= auto.before["flops"]  # 5x5 merges cost more: refused by cost
    assert any("fold='auto'" in e["reason"] for e in auto.left)
    always = collapse(model, stats, x, exact=False, fold="always", measure_latency=False, sites=[])
    kinds = [e["kind"] for e in always.removed]
    assert kinds.count("residual_identity") + kinds.count("residual_parallel") == 8
    # The blocks' merged convs compose across the removed ReLUs too: stem .. last block, then fc.
    assert always.after["longest_path"] == 2 < always.before["longest_path"] == 18
    assert not always.exact
    with torch.no_grad():
        dev = float((y - always.model(x)).abs().max())
    assert always.max_deviation == pytest.approx(dev, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name", ["swin_t", pytest.param("vit_b_16", marks=pytest.mark.slow)])
def test_torchvision_transformer_mlps_identity_fold_exactly(name):
    build, shape, _ = CASES[name]
    torch.manual_seed(0)
    model = build().eval()
    if name == "vit_b_16":
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # zero-initialised by torchvision
    x = torch.randn(*shape)
    stats = measure_entropy(model, [x], progress=False)
    mlp = [s for s in stats.sites if ".mlp." in s]
    assert mlp and len(mlp) == len(stats.sites)
    remove_sites(model, stats, mlp)
    with torch.no_grad():
        y = model(x)
    out = collapse(model, stats, x, measure_latency=False, sites=[])  # exact=True, fold="auto"
    kinds = [e["kind"] for e in out.removed]
    assert kinds.count("compose_linear") == len(mlp) and out.exact
    assert out.after["sites"] == 0 and out.after["flops"] < out.before["flops"]
    assert out.after["longest_path"] == out.before["longest_path"] - len(mlp)
    with torch.no_grad():
        assert _rel(y, out.model(x)) <= 1e-4
