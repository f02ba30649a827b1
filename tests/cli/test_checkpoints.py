"""Checkpoints: RNG state, atomic writes, save/load with weights_only, a bit-exact resume."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from egp_fast.cli.checkpoints import (
    atomic_write_text,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from egp_fast.cli.data import load_data
from egp_fast.cli.loader import make_loader
from egp_fast.cli.models import cifar_resnet18
from egp_fast.cli.train import build_optimizer, build_scheduler, train_epoch
from egp_fast.errors import CheckpointError

CPU = torch.device("cpu")


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
