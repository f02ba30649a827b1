"""Training pieces: optimizer and schedule, AMP, the epoch loops, latency."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from egp_fast.cli.data import load_data
from egp_fast.cli.loader import make_loader
from egp_fast.cli.train import autocast, build_optimizer, build_scheduler, evaluate, measure_latency, train_epoch
from egp_fast.errors import ConfigError

CPU = torch.device("cpu")


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


def test_measure_latency_positive():
    assert measure_latency(_small(), torch.zeros(4, 1, 8, 8), repeats=3, warmup=1) > 0
