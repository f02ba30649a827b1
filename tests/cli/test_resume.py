"""A run SIGKILLed mid-round and resumed ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from egp_fast.cli.commands import main

ARGS = ["--width", "4", "--image-size", "8", "--limit", "300", "--dense-epochs", "1", "--epochs", "3",
        "--rounds", "2", "--batch-size", "32", "--no-progress", "--no-latency", "--no-collapse", "--seed", "3"]


def _rows(run):
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r.pop("seconds")  # wall time is the only thing allowed to differ
    return rows


def _masks(run):
    sd = torch.load(run / "model.pt", weights_only=True)
    return {k: v for k, v in sd.items() if k.endswith("weight_mask")}, sd


def _finetune_rows(run) -> int:
    with open(run / "metrics.csv") as f:
        return sum(1 for r in csv.DictReader(f) if r["phase"] == "finetune")


# The run, in a child process, stops itself at a fixed point: two batches into round 1's second
# fine-tune epoch (the first epoch's checkpoint is written, the second epoch's work is not). It
# writes the marker file there and sleeps until the test kills it, so the kill lands at the same
# place however loaded the machine is.
_STALLING_RUN = """
import pathlib, sys, time
import egp_fast.cli.train as train
from egp_fast.cli.commands import main

marker = pathlib.Path(sys.argv[1])
real, calls = train.train_epoch, []


class Stall:
    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == 2:
                marker.write_text("mid-epoch")
                time.sleep(3600)  # SIGKILLed here
            yield batch


def train_epoch(model, loader, *a, **k):
    calls.append(1)  # 1: the dense epoch, 2: round 1 epoch 1, 3: round 1 epoch 2
    return real(model, Stall(loader) if len(calls) == 3 else loader, *a, **k)


train.train_epoch = train_epoch
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_mid_round_then_resume_matches_uninterrupted(tmp_path):
    killed = tmp_path / "killed"
    marker = tmp_path / "stalled"
    proc = subprocess.Popen([sys.executable, "-c", _STALLING_RUN, str(marker), "prune", *ARGS, "--out", str(killed)],
                            env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the run never reached round 1's second epoch"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    rep = json.loads((killed / "report.json").read_text())
    assert rep["complete"] is False and len(rep["rounds"]) == 1  # only the dense round is recorded
    assert _finetune_rows(killed) == 1  # the last checkpoint: round 1, epoch 1
    assert not (killed / "model.pt").exists()

    assert main(["prune", "--resume", str(killed), "--no-progress"]) == 0
    straight = tmp_path / "straight"
    assert main(["prune", *ARGS, "--out", str(straight)]) == 0

    assert _rows(killed) == _rows(straight)
    (mk, sk), (ms, ss) = _masks(killed), _masks(straight)
    assert mk.keys() == ms.keys() and all(torch.equal(mk[k], ms[k]) for k in mk)
    assert all(torch.equal(sk[k], ss[k]) for k in sk)  # weights too: bit for bit
    a = json.loads((killed / "report.json").read_text())
    b = json.loads((straight / "report.json").read_text())
    for ra, rb in zip(a["rounds"], b["rounds"], strict=True):
        for key in ("sparsity", "accuracy", "loss", "entropy", "allocation", "zero_entropy_sites", "layers"):
            assert ra[key] == rb[key], key
    assert not [n for n in os.listdir(killed) if ".tmp-" in n]


@pytest.mark.parametrize("cut", ["after_dense", "after_apply"])
def test_resume_from_each_checkpoint_kind(tmp_path, cut):
    """Resume from the checkpoints between phases (end of dense training, right after a prune)."""
    from egp_fast.cli.checkpoints import load_checkpoint, save_checkpoint

    small = ["--width", "4", "--image-size", "8", "--limit", "120", "--dense-epochs", "1", "--epochs", "1",
             "--rounds", "1", "--batch-size", "32", "--no-progress", "--no-latency", "--no-collapse"]
    full = tmp_path / "full"
    assert main(["prune", *small, "--out", str(full)]) == 0
    # Rebuild the intermediate checkpoint by re-running up to the cut with a recording hook.
    part = tmp_path / "part"
    saved = []
    import egp_fast.cli.run as run_module

    orig = run_module.Run._checkpoint

    def spy(self, opt=None, sch=None):
        orig(self, opt, sch)
        st = self.state
        if (cut == "after_dense" and st["phase"] == "round" and st["epoch"] == -1) or (
                cut == "after_apply" and st["phase"] == "round" and st["epoch"] == 0):
            saved.append(load_checkpoint(self.ckpt_path))
            raise KeyboardInterrupt  # stop here, as a kill would

    run_module.Run._checkpoint = spy
    try:
        assert main(["prune", *small, "--out", str(part)]) == 130
    finally:
        run_module.Run._checkpoint = orig
    assert saved
    save_checkpoint(part / "checkpoint.pt", {k: v for k, v in saved[0].items() if k != "format"})
    assert main(["prune", "--resume", str(part), "--no-progress"]) == 0
    assert _rows(part) == _rows(full)
    (mp, _), (mf, _) = _masks(part), _masks(full)
    assert all(torch.equal(mp[k], mf[k]) for k in mf)


def test_easier_resume_rebuilds_the_removed_sites(tmp_path):
    """EASIER changes the model's structure each step: a resumed run rebuilds the removed sites on a
    fresh model before loading the checkpoint, and ends where an uninterrupted run ends."""
    from egp_fast.cli.checkpoints import load_checkpoint, save_checkpoint

    small = ["--method", "easier", "--width", "4", "--image-size", "8", "--limit", "200", "--dense-epochs", "1",
             "--epochs", "1", "--rounds", "2", "--max-drop", "0.5", "--batch-size", "32", "--no-progress",
             "--no-latency", "--no-collapse"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["prune", *small, "--out", str(full)]) == 0
    saved = []
    import egp_fast.cli.run as run_module

    orig = run_module.Run._checkpoint

    def spy(self, opt=None, sch=None):
        orig(self, opt, sch)
        st = self.state
        if st["phase"] == "round" and st["round"] == 2 and st["epoch"] == 0:  # round 2's site just removed
            saved.append(load_checkpoint(self.ckpt_path))
            raise KeyboardInterrupt

    run_module.Run._checkpoint = spy
    try:
        assert main(["prune", *small, "--out", str(part)]) == 130
    finally:
        run_module.Run._checkpoint = orig
    assert saved and any(k.endswith(".scale") for k in saved[0]["model"])  # a ChannelAffine in the checkpoint
    save_checkpoint(part / "checkpoint.pt", {k: v for k, v in saved[0].items() if k != "format"})
    assert main(["prune", "--resume", str(part), "--no-progress"]) == 0
    assert _rows(part) == _rows(full)
    a = torch.load(part / "model.pt", weights_only=True)
    b = torch.load(full / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((part / "report.json").read_text())
    rb = json.loads((full / "report.json").read_text())
    assert ra["easier"]["removed"] == rb["easier"]["removed"] and len(ra["easier"]["removed"]) == 2
    assert [r["removed_sites"] for r in ra["rounds"]] == [r["removed_sites"] for r in rb["rounds"]]
