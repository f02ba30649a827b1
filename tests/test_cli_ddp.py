"""torchrun with 2 gloo processes on the CPU gives the same entropy counts and masks as 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from egp_fast.cli import main
from egp_fast.data import load_data, make_loader
from egp_fast.models import build_model
from egp_fast.train import build_optimizer, train_epoch


def _trained_weights(path):
    # A briefly trained model, so the entropies are neither all 1 nor all 0 and ties are rare.
    torch.manual_seed(0)
    model = build_model("cifar_resnet18", 10, in_channels=1, width=4)
    src = load_data("digits", image_size=8, limit=200)
    ld = make_loader(src.train, 32, shuffle=True)
    opt = build_optimizer(model, lr=0.05)
    for e in range(2):
        ld.set_epoch(e)
        train_epoch(model, ld, opt, device=torch.device("cpu"))
    torch.save(model.state_dict(), path)


def _masks(run):
    sd = torch.load(run / "model.pt", weights_only=True)
    return {k: v for k, v in sd.items() if k.endswith("weight_mask")}


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_two_gloo_ranks_match_one_process(tmp_path):
    weights = tmp_path / "w.pt"
    _trained_weights(weights)
    # No training between measurements: only the measurement (counts summed over disjoint shards)
    # and the planning can make the runs differ, and they must not.
    common = ["--weights", str(weights), "--width", "4", "--image-size", "8", "--limit", "200",
              "--dense-epochs", "0", "--epochs", "0", "--rounds", "2", "--eval-batch-size", "32",
              "--batch-size", "32", "--no-progress", "--no-latency", "--no-collapse"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["prune", *common, "--out", str(one)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "egp_fast.cli", "prune", *common, "--out", str(two)],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
    # Only rank 0 prints: the table header appears once.
    assert proc.stdout.count("zero-H sites") == 1

    a = json.loads((one / "report.json").read_text())
    b = json.loads((two / "report.json").read_text())
    assert len(a["rounds"]) == len(b["rounds"]) == 3
    for ra, rb in zip(a["rounds"], b["rounds"], strict=True):
        for sa, sb in zip(ra["stats"]["sites"], rb["stats"]["sites"], strict=True):
            assert sa["name"] == sb["name"]
            assert sa["observations"] == sb["observations"]  # summed over the 2 shards
            assert sa["p_on"] == sb["p_on"]  # from integer counts: exactly equal
            assert sa["entropy"] == sb["entropy"]
        for key in ("allocation", "zero_entropy_sites", "sparsity", "accuracy", "layers"):
            assert ra[key] == rb[key], key
    ma, mb = _masks(one), _masks(two)
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.slow
def test_two_gloo_ranks_train_and_collapse(tmp_path):
    """The full path under DDP: dense training, fine-tuning, collapse; ranks must agree on masks."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "egp_fast.cli", "prune", "--width", "4", "--image-size", "8", "--limit", "200",
         "--dense-epochs", "1", "--epochs", "1", "--rounds", "2", "--batch-size", "32", "--no-progress",
         "--no-latency", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["complete"] and rep["summary"]["world_size"] == 2 and "acc_collapsed" in rep["summary"]
