"""The model registry's digits ViT: structure, tracing, training, EASIER-style folding, and the
saved collapsed model running at any batch size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import egp_fast
from egp_fast.cli.data import load_data, make_loader
from egp_fast.errors import ModelError
from egp_fast.cli.models import DigitsViT, build_model, digits_vit, model_in_channels, resolve_model_name
from egp_fast.cli.run import _save_collapsed
from egp_fast.cli.train import build_optimizer, evaluate, train_epoch

CPU = torch.device("cpu")


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


def _collapsed_resnet():
    net = build_model("cifar_resnet18", 10, in_channels=1, width=4).eval()
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        net.layer3[0].bn1.bias.fill_(5.0)  # relu1 of that block always ON: a zero-entropy site
    stats = egp_fast.measure_entropy(net, [x], progress=False)
    out = egp_fast.collapse(net, stats, x[:2], measure_latency=False, max_flip=1.0)
    assert out.removed_sites
    return out.model, x


def _collapsed_vit():
    net = digits_vit(10, dim=16, depth=2, heads=4, mlp=32).eval()
    x = torch.randn(16, 1, 16, 16)
    stats = egp_fast.measure_entropy(net, [x], progress=False)
    egp_fast.linearize(net, stats, sites=list(stats.sites), how="identity")
    return egp_fast.collapse(net, stats, x[:2], measure_latency=False).model, x


@pytest.mark.parametrize("build", [_collapsed_resnet, _collapsed_vit], ids=["resnet", "vit"])
def test_saved_collapsed_model_runs_at_batch_1_7_64(build, tmp_path):
    """collapsed.pt2 was exported at batch 2 with a dynamic batch: load the file and compare it
    with the in-memory collapsed model at batch 1, 7 and 64."""
    model, x = build()
    saved = _save_collapsed(model, x[:2], str(tmp_path))
    assert saved["format"] == "torch.export" and "batch" in saved["dynamic"]
    loaded = torch.export.load(str(tmp_path / "collapsed.pt2")).module()
    for b in (1, 7, 64):
        xb = torch.randn(b, *x.shape[1:])
        with torch.no_grad():
            want, got = model(xb), loaded(xb)
        assert got.shape == (b, 10) and torch.allclose(got, want, atol=1e-5, rtol=1e-4), b
    sd = torch.load(tmp_path / "collapsed_state_dict.pt", weights_only=True)
    assert set(sd) == set(model.state_dict())
