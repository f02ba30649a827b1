"""Training pieces: model registry, optimizer/schedule, loops, RNG state, atomic checkpoints."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from egp_fast.cli.data import load_data, make_loader
from egp_fast.errors import CheckpointError, ConfigError, ModelError
from egp_fast.cli.models import build_model, cifar_resnet18, load_weights, model_in_channels, resolve_model_name
from egp_fast.cli.train import (
    DistInfo,
    atomic_write_text,
    autocast,
    build_optimizer,
    build_scheduler,
    capture_rng_state,
    evaluate,
    init_distributed,
    load_checkpoint,
    measure_latency,
    restore_rng_state,
    save_checkpoint,
    train_epoch,
    unwrap,
    wrap_ddp,
)

CPU = torch.device("cpu")


# ------------------------------------------------------------------ models
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


# ------------------------------------------------------------------ optimizer and schedule
def test_build_optimizer_and_errors():
    m = nn.Linear(3, 3)
    opt = build_optimizer(m, "sgd", lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    adamw = build_optimizer(m, "adamw", lr=1e-3)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["fused"]  # CPU: fused
    on_meta = build_optimizer(nn.Linear(3, 3, device="meta"), "adamw", lr=1e-3)  # no fused kernel
    assert isinstance(on_meta, torch.optim.AdamW) and not on_meta.param_groups[0]["fused"]
    with pytest.raises(ConfigError, match="--optimizer"):
        build_optimizer(m, "lion")
    with pytest.raises(ConfigError, match="learning rate"):
        build_optimizer(m, lr=0.0)
    with pytest.raises(ConfigError, match="--weight-decay"):
        build_optimizer(m, weight_decay=-1.0)


def _lrs(name, epochs, **kw):
    opt = build_optimizer(nn.Linear(2, 2), lr=0.1)
    sch = build_scheduler(opt, name, epochs=epochs, **kw)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradients: a no-op that keeps the scheduler's call-order check quiet
        sch.step()
    return out


def test_schedules():
    ms = _lrs("multistep", 8)  # milestones 4 and 6 (fractions 0.5, 0.75)
    assert ms == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)
    assert _lrs("multistep", 10, milestones=(3,)) == pytest.approx([0.1] * 3 + [0.01] * 7)
    cos = _lrs("cosine", 5)
    assert cos[0] == pytest.approx(0.1) and all(a > b for a, b in zip(cos, cos[1:]))
    assert _lrs("constant", 3) == pytest.approx([0.1] * 3)
    with pytest.raises(ConfigError, match="--schedule"):
        _lrs("poly", 3)
    with pytest.raises(ConfigError, match="--milestones"):
        _lrs("multistep", 3, milestones=(0,))


# ------------------------------------------------------------------ loops
def _small():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def test_train_epoch_learns_digits_and_evaluate_counts():
    src = load_data("digits", image_size=8)
    model = _small()
    opt = build_optimizer(model, lr=0.1)
    ld = make_loader(src.train, 64, shuffle=True, seed=0)
    before = evaluate(model, make_loader(src.test, 100), device=CPU)
    for e in range(3):
        ld.set_epoch(e)
        out = train_epoch(model, ld, opt, device=CPU)
    after = evaluate(model, make_loader(src.test, 100), device=CPU)
    assert out["samples"] == 22 * 64 and 0 <= out["acc"] <= 1
    assert after["samples"] == 360 and after["acc"] > 0.85 > before["acc"]
    assert after["loss"] < before["loss"]
    assert model.training  # evaluate restores the mode


def test_train_epoch_amp_cpu_bf16():
    src = load_data("digits", image_size=8, limit=128)
    model = _small()
    ld = make_loader(src.train, 32, shuffle=True)
    ld.set_epoch(0)
    out = train_epoch(model, ld, build_optimizer(model, lr=0.05), device=CPU, amp=True)
    assert np.isfinite(out["loss"])
    with autocast(CPU, True):
        assert model(src.train.x[:2]).dtype == torch.bfloat16
    assert model(src.train.x[:2]).dtype == torch.float32


def test_train_epoch_raises_on_nan():
    from egp_fast.errors import NumericsError

    src = load_data("digits", image_size=8, limit=64)
    model = _small()
    with torch.no_grad():
        model[1].weight.fill_(float("nan"))
    ld = make_loader(src.train, 32, shuffle=True)
    ld.set_epoch(0)
    with pytest.raises(NumericsError, match="--lr"):
        train_epoch(model, ld, build_optimizer(model, lr=0.1), device=CPU)


def _run_epochs(model, opt, sch, ld, epochs):
    for e in epochs:
        ld.set_epoch(e)
        train_epoch(model, ld, opt, device=CPU)
        sch.step()


def test_resume_from_checkpoint_is_bitwise_identical(tmp_path):
    """Train 3 epochs straight vs 1 epoch, checkpoint, fresh objects, 2 more: same weights."""
    src = load_data("digits", image_size=8, limit=256)

    def fresh():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Dropout(0.2), nn.ReLU(), nn.Linear(32, 10))
        opt = build_optimizer(m, lr=0.05)
        return m, opt, build_scheduler(opt, "cosine", epochs=3), make_loader(src.train, 32, shuffle=True, seed=4)

    m1, o1, s1, l1 = fresh()
    _run_epochs(m1, o1, s1, l1, range(3))

    m2, o2, s2, l2 = fresh()
    _run_epochs(m2, o2, s2, l2, range(1))
    save_checkpoint(tmp_path / "c.pt", {"model": m2.state_dict(), "opt": o2.state_dict(),
                                        "sched": s2.state_dict(), "rng": capture_rng_state(), "epoch": 1})
    torch.manual_seed(999)  # disturb every RNG before resuming
    random.seed(5)
    np.random.seed(5)
    state = load_checkpoint(tmp_path / "c.pt")
    m3, o3, s3, l3 = fresh()
    m3.load_state_dict(state["model"])
    o3.load_state_dict(state["opt"])
    s3.load_state_dict(state["sched"])
    restore_rng_state(state["rng"])
    _run_epochs(m3, o3, s3, l3, range(state["epoch"], 3))
    for a, b in zip(m1.state_dict().values(), m3.state_dict().values()):
        assert torch.equal(a, b)


def test_measure_latency_positive():
    assert measure_latency(_small(), torch.zeros(4, 1, 8, 8), repeats=3, warmup=1) > 0


# ------------------------------------------------------------------ RNG and checkpoints
def test_rng_state_roundtrip_through_checkpoint(tmp_path):
    state = capture_rng_state()
    expect = (torch.rand(3), np.random.rand(3), random.random())
    save_checkpoint(tmp_path / "r.pt", {"rng": state})
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    restore_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expect[0], got[0]) and np.array_equal(expect[1], got[1]) and expect[2] == got[2]


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    p = tmp_path / "c.pt"
    save_checkpoint(p, {"model": cifar_resnet18(10, width=4).state_dict()})
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(p)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")


def test_foreign_checkpoint_refused(tmp_path):
    torch.save({"epoch": 1}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not an egp_fast checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    torch.save(nn.Linear(2, 2), tmp_path / "pickled.pt")  # needs arbitrary unpickling: refused
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "pickled.pt")


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two" and os.listdir(tmp_path) == ["f.txt"]
    save_checkpoint(tmp_path / "c.pt", {"a": 1})
    save_checkpoint(tmp_path / "c.pt", {"a": 2})
    assert load_checkpoint(tmp_path / "c.pt")["a"] == 2 and sorted(os.listdir(tmp_path)) == ["c.pt", "f.txt"]


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "c.pt"
    save_checkpoint(p, {"a": 1})

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_checkpoint(p, {"a": 2})
    monkeypatch.undo()
    assert load_checkpoint(p)["a"] == 1 and os.listdir(tmp_path) == ["c.pt"]


# ------------------------------------------------------------------ distributed helpers (1 process)
def test_single_process_dist_helpers(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.distributed, info.is_main) == (0, 1, False, True)
    m = nn.Linear(2, 2)
    assert wrap_ddp(m, info) is m and unwrap(m) is m
    assert DistInfo().device.type == "cpu"
    with pytest.raises(ConfigError, match="--device"):
        init_distributed("tpu")
