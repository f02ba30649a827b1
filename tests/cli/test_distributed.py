"""The distributed helpers in one process, and torchrun with 2 gloo processes on the CPU: the same
entropy counts and masks as 1 process, ranks that agree on masks and weights through fine-tuning,
and --resume of an interrupted 2-process run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from egp_fast.cli.commands import main
from egp_fast.cli.data import load_data
from egp_fast.cli.distributed import DistInfo, all_reduce_sum, broadcast_buffers, init_distributed, wrap_ddp
from egp_fast.cli.loader import make_loader
from egp_fast.cli.models import build_model
from egp_fast.cli.timing import PHASES
from egp_fast.cli.train import build_optimizer, train_epoch
from egp_fast.errors import ConfigError
from egp_fast.graph import unwrap_model

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

# Runs egp-fast under torchrun; every rank saves its own model at the end (rank<r>.pt), and with
# EGP_TEST_STOP_ROUND=k every rank stops (as Ctrl-C would) right after round k's masks are applied.
_WRAPPER = textwrap.dedent('''
    import os, sys, torch
    import egp_fast.cli.run as run_module
    from egp_fast.cli.commands import main

    out, stop = os.environ["EGP_TEST_RANK_DIR"], os.environ.get("EGP_TEST_STOP_ROUND")
    final, checkpoint = run_module.Run._final, run_module.Run._checkpoint

    def _final(self):
        rank = int(os.environ.get("RANK", "0"))
        torch.save(self.model.state_dict(), os.path.join(out, f"rank{rank}.pt"))
        return final(self)

    def _checkpoint(self, opt=None, sch=None):
        checkpoint(self, opt, sch)
        st = self.state
        if stop and st["phase"] == "round" and st["round"] == int(stop) and st["epoch"] == 0:
            raise KeyboardInterrupt

    run_module.Run._final, run_module.Run._checkpoint = _final, _checkpoint
    sys.exit(main(sys.argv[1:]))
''')


# ------------------------------------------------------------------ distributed helpers (1 process)
def test_single_process_dist_helpers(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.distributed, info.is_main) == (0, 1, False, True)
    m = nn.Linear(2, 2)
    assert wrap_ddp(m, info) is m and unwrap_model(m) is m
    assert DistInfo().device.type == "cpu"
    assert all_reduce_sum([1.0, 2.5], info) == [1.0, 2.5] and all_reduce_sum([3.0], None) == [3.0]
    bn = nn.BatchNorm1d(3)
    broadcast_buffers(bn, info)  # one process: nothing to copy, nothing changed
    assert torch.equal(bn.running_mean, torch.zeros(3))
    with pytest.raises(ConfigError, match="--device"):
        init_distributed("tpu")


# ------------------------------------------------------------------ torchrun, 2 processes
def _torchrun(tmp_path, argv, stop=None, timeout=300):
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(_WRAPPER)
    ranks = tmp_path / f"ranks-{len(list(tmp_path.glob('ranks-*')))}"
    ranks.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EGP_TEST_RANK_DIR": str(ranks)}
    if stop is not None:
        env["EGP_TEST_STOP_ROUND"] = str(stop)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(wrapper), *argv], env=env, capture_output=True, text=True, timeout=timeout)
    return proc, ranks


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


def _masks(sd):
    return {k: v for k, v in sd.items() if k.endswith("weight_mask")}


def _assert_pruned_weights_zero(sd):
    masks = _masks(sd)
    assert masks
    for k, m in masks.items():
        w = sd[k[: -len("_mask")]]
        assert float(w[~m.bool()].abs().sum()) == 0.0, k


def _rows(run):
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r.pop("seconds")
    return rows


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
    # Only rank 0 prints: the dense round's line (a pipe gets plain lines) appears once.
    assert proc.stdout.count("round 0  sparsity") == 1

    a = json.loads((one / "report.json").read_text())
    b = json.loads((two / "report.json").read_text())
    assert len(a["rounds"]) == len(b["rounds"]) == 3
    for ra, rb in zip(a["rounds"], b["rounds"], strict=True):
        for sa, sb in zip(ra["stats"]["sites"], rb["stats"]["sites"], strict=True):
            assert sa["name"] == sb["name"]
            assert sa["observations"] == sb["observations"]  # summed over the 2 shards
            assert sa["p_on"] == sb["p_on"]  # from integer counts: exactly equal
            assert sa["entropy"] == sb["entropy"]
        for key in ("allocation", "zero_entropy_sites", "sparsity", "accuracy", "val_accuracy", "layers"):
            assert ra[key] == rb[key], key
    # every round's time split (rank 0's): seconds per phase, other the rest of the round's wall time
    for r in b["rounds"]:
        t = r["time"]
        assert set(t) == set(PHASES) | {"other"} and all(v >= 0 for v in t.values()), t
        assert t["measure"] > 0 and t["eval"] > 0
        assert sum(t.values()) == pytest.approx(r["seconds"], rel=1e-9, abs=1e-9)
    assert b["rounds"][1]["time"]["select"] > 0 and b["rounds"][1]["time"]["masks"] > 0
    assert "time (rank 0 of 2)" in proc.stdout
    ma = _masks(torch.load(one / "model.pt", weights_only=True))
    mb = _masks(torch.load(two / "model.pt", weights_only=True))
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.slow
def test_two_gloo_ranks_fine_tune_in_agreement(tmp_path):
    """Dense training and fine-tuning under DDP: both ranks end with the same masks and the same
    weights, and the pruned weights are exactly zero on each rank."""
    out = tmp_path / "ddp"
    proc, ranks = _torchrun(tmp_path, [
        "prune", "--width", "4", "--image-size", "8", "--limit", "200", "--dense-epochs", "1", "--epochs", "1",
        "--rounds", "2", "--batch-size", "32", "--no-progress", "--no-latency", "--no-collapse", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(ranks / "rank0.pt", weights_only=True)
    r1 = torch.load(ranks / "rank1.pt", weights_only=True)
    assert r0.keys() == r1.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in _masks(r0)), "ranks derived different masks"
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "ranks ended with different weights or buffers"
    _assert_pruned_weights_zero(r0)
    _assert_pruned_weights_zero(r1)
    rep = json.loads((out / "report.json").read_text())
    assert rep["complete"] and rep["summary"]["world_size"] == 2
    assert rep["rounds"][-1]["sparsity"] == pytest.approx(0.75, abs=1e-3)


@pytest.mark.slow
def test_resume_under_torchrun_matches_uninterrupted(tmp_path):
    """A 2-process run stopped right after round 2's pruning, resumed with --resume under torchrun,
    ends exactly where an uninterrupted 2-process run ends."""
    args = ["--width", "4", "--image-size", "8", "--limit", "200", "--dense-epochs", "1", "--epochs", "1",
            "--rounds", "2", "--batch-size", "32", "--no-progress", "--no-latency", "--no-collapse"]
    cut, straight = tmp_path / "cut", tmp_path / "straight"
    proc, _ = _torchrun(tmp_path, ["prune", *args, "--out", str(cut)], stop=2)
    assert proc.returncode != 0 and "interrupted" in proc.stderr
    assert json.loads((cut / "report.json").read_text())["complete"] is False
    proc, ranks = _torchrun(tmp_path, ["prune", "--resume", str(cut), "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stdout
    proc, _ = _torchrun(tmp_path, ["prune", *args, "--out", str(straight)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _rows(cut) == _rows(straight)
    a, b = torch.load(cut / "model.pt", weights_only=True), torch.load(straight / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _assert_pruned_weights_zero(torch.load(ranks / "rank1.pt", weights_only=True))
