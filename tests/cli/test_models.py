"""The model registry: the CIFAR ResNet-18, torchvision and timm models, local weights, and the
digits ViT (structure, tracing, training, EASIER-style folding)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import egp_fast
from egp_fast.cli.data import load_data
from egp_fast.cli.loader import make_loader
from egp_fast.cli.models import (
    DigitsViT,
    build_model,
    cifar_resnet18,
    digits_vit,
    load_weights,
    model_in_channels,
    resolve_model_name,
)
from egp_fast.cli.train import build_optimizer, evaluate, train_epoch
from egp_fast.errors import ModelError

CPU = torch.device("cpu")


# ------------------------------------------------------------------ registry and weights
def test_cifar_resnet18_structure():
    net = cifar_resnet18(10, width=8, in_channels=1)
    relus = [n for n, m in net.named_modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 17 and "layer1.0.relu1" in relus and "layer4.1.relu2" in relus
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert net(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    assert net.layer2[0].downsample is not None and net.layer1[0].downsample is None
    assert net.fc.in_features == 64


def test_resolve_and_build_torchvision_and_timm():
    assert resolve_model_name("cifar_resnet18") == ("cifar", "cifar_resnet18")
    assert resolve_model_name("resnet18") == ("torchvision", "resnet18")
    assert resolve_model_name("timm:resnet18") == ("timm", "resnet18")
    assert model_in_channels("resnet18", 1) == 3 and model_in_channels("cifar_resnet18", 1) == 1
    tv = build_model("resnet18", 7)
    assert tv.fc.out_features == 7
    tm = build_model("timm:resnet10t", 5, in_channels=1)
    assert tm(torch.randn(2, 1, 32, 32)).shape == (2, 5)


@pytest.mark.parametrize("name", ["resnet_nope", "timm:not_a_model", ""])
def test_unknown_model(name):
    with pytest.raises(ModelError):
        build_model(name, 10)


def test_torchvision_model_needs_three_channels():
    with pytest.raises(ModelError, match="3 input channels"):
        build_model("resnet18", 10, in_channels=1)


def test_load_weights_roundtrip_and_errors(tmp_path):
    a = cifar_resnet18(10, width=4)
    torch.save({"model": a.state_dict()}, tmp_path / "w.pt")
    b = load_weights(cifar_resnet18(10, width=4), tmp_path / "w.pt")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ModelError, match="does not match the model"):
        load_weights(cifar_resnet18(10, width=8), tmp_path / "w.pt")
    with pytest.raises(ModelError, match="no such file"):
        load_weights(a, tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="cannot be read"):
        load_weights(a, tmp_path / "bad.pt")


def test_load_weights_refuses_pickled_objects(tmp_path):
    # weights_only=True: a pickled module (arbitrary code on load) is refused.
    torch.save(nn.Linear(2, 2), tmp_path / "obj.pt")
    with pytest.raises(ModelError, match="cannot be read"):
        load_weights(nn.Linear(2, 2), tmp_path / "obj.pt")


# ------------------------------------------------------------------ digits ViT
def test_digits_vit_structure():
    net = digits_vit(10)
    gelus = [n for n, m in net.named_modules() if isinstance(m, nn.GELU)]
    assert gelus == [f"blocks.{i}.mlp.act" for i in range(6)]
    for i in range(6):
        mlp = net.blocks[i].mlp
        assert type(mlp.fc1) is nn.Linear and (mlp.fc1.in_features, mlp.fc1.out_features) == (64, 256)
        assert type(mlp.fc2) is nn.Linear and (mlp.fc2.in_features, mlp.fc2.out_features) == (256, 64)
    assert isinstance(net.patch_embed, nn.Conv2d) and net.patch_embed.stride == (4, 4)
    assert net.pos_embed.shape == (1, 17, 64) and net.cls_token.shape == (1, 1, 64)  # 16 patches + class token
    assert net(torch.randn(5, 1, 16, 16)).shape == (5, 10)
    assert resolve_model_name("digits_vit") == ("vit", "digits_vit") and model_in_channels("digits_vit", 1) == 1
    via_registry = build_model("digits_vit", 7, in_channels=3, width=32, image_size=8)
    assert isinstance(via_registry, DigitsViT) and via_registry(torch.randn(2, 3, 8, 8)).shape == (2, 7)


@pytest.mark.parametrize("kw, words", [({"image_size": 18}, "divisible by patch"), ({"dim": 30}, "heads"),
                                       ({"depth": 0}, "positive"), ({"mlp": 2.5}, "positive")])
def test_digits_vit_bad_sizes(kw, words):
    with pytest.raises(ModelError, match=words):
        digits_vit(10, **kw)


def test_digits_vit_traces_and_has_six_gelu_sites():
    net = digits_vit(10).eval()
    x = torch.randn(3, 1, 16, 16)
    gm = torch.fx.symbolic_trace(net)
    with torch.no_grad():
        assert torch.allclose(gm(x), net(x), atol=1e-6)
        # the trace keeps the batch symbolic: another batch size runs through the same graph
        assert torch.allclose(gm(x[:1]), net(x[:1]), atol=1e-6)
    graph = egp_fast.discover_sites(net, x)
    assert [s.name for s in graph.sites] == [f"blocks.{i}.mlp.act" for i in range(6)]
    assert [s.producers for s in graph.sites] == [[f"blocks.{i}.mlp.fc1"] for i in range(6)]
    assert all(s.channel_dim in (-1, 2) for s in graph.sites)  # token features: the last dim


def _small_trained_vit():
    src = load_data("digits")
    net = digits_vit(10, dim=32, depth=2, heads=4, mlp=64)
    ld = make_loader(src.train, 32, shuffle=True)
    opt = build_optimizer(net, "adamw", lr=2e-3, weight_decay=1e-4)
    for e in range(4):
        ld.set_epoch(e)
        train_epoch(net, ld, opt, device=CPU)
    return net, src


def test_digits_vit_trains_on_digits_and_its_mlps_fold_exactly():
    """Four epochs (~10 s on one core) reach well above chance; removing every GELU (EASIER's
    identity) lets collapse compose each block's fc1 -> fc2 into one linear layer, exactly."""
    net, src = _small_trained_vit()
    acc = evaluate(net, make_loader(src.test, 256), device=CPU)["acc"]
    assert acc > 0.4, acc  # chance is 0.1 (measured: 0.66 with seed 0)
    x = src.test.x[:128]
    stats = egp_fast.measure_entropy(net, [x], progress=False)
    assert egp_fast.linearize(net, stats, sites=list(stats.sites), how="identity") == list(stats.sites)
    out = egp_fast.collapse(net, stats, x[:2], measure_latency=False)
    composed = [e["layers"] for e in out.removed if e["kind"] == "compose_linear"]
    assert composed == [["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"], ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]]
    assert out.after["flops"] < out.before["flops"] and out.after["longest_path"] == out.before["longest_path"] - 2
    with torch.no_grad():
        ref, got = net.eval()(x), out.model(x)
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-4
