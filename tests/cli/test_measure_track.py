"""``egp-fast prune --measure track``: the entropies of a round are counted during its last training
epoch (Pruner.track) instead of a separate measurement pass; where no epoch was tracked (no dense
epochs, a resumed run) the run measures with a pass and says so in the log and the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import egp_fast.cli.run as run_module
from egp_fast.cli.commands import main
from egp_fast.cli.report import summary_text
from egp_fast.pruning import Pruner

SMALL = ["--width", "4", "--image-size", "8", "--limit", "120", "--batch-size", "32", "--eval-batch-size", "64",
         "--no-progress", "--no-latency"]


class _Spy:
    """Counts the measurement passes and keeps every tracker the run opens."""

    def __init__(self, monkeypatch):
        self.passes, self.trackers = 0, []
        measure, track = Pruner.measure, Pruner.track
        spy = self

        def counted_measure(self, *args, **kwargs):
            spy.passes += 1
            return measure(self, *args, **kwargs)

        class _Keep:
            def __init__(self, cm):
                self.cm = cm

            def __enter__(self):
                t = self.cm.__enter__()
                spy.trackers.append(t)
                return t

            def __exit__(self, *exc):
                return self.cm.__exit__(*exc)

        def kept_track(self):
            return _Keep(track(self))

        monkeypatch.setattr(Pruner, "measure", counted_measure)
        monkeypatch.setattr(Pruner, "track", kept_track)


def _report(out):
    return json.loads((out / "report.json").read_text())


def test_track_replaces_every_measurement_pass(tmp_path, monkeypatch, capsys):
    spy = _Spy(monkeypatch)
    out = tmp_path / "run"
    assert main(["prune", *SMALL, "--dense-epochs", "1", "--epochs", "2", "--rounds", "2", "--measure", "track",
                 "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert spy.passes == 0  # the rounds and the collapse at the end use the tracked counts
    # one tracked epoch per round: the last dense epoch, then each round's last fine-tune epoch
    assert len(spy.trackers) == 3
    rep = _report(out)
    rounds = rep["rounds"]
    assert [r["measure_source"] for r in rounds] == ["track"] * 3
    assert all("measure_note" not in r for r in rounds)
    for r, t in zip(rounds, spy.trackers, strict=True):
        # the round's statistics are the tracker's: one epoch's training forwards, every sample once
        assert r["measure_batches"] == t.batches > 0
        assert r["measure_stopped_early"] is None
        stats = t.stats()
        assert r["entropy"] == pytest.approx({n: s.entropy for n, s in stats.sites.items()})
        samples = {s["samples"] for s in r["stats"]["sites"]}
        assert samples == {t._counter.total_samples}
    # the split: the counting is in train; measure is only the summing of the counts (tiny)
    for r in rounds[1:]:
        assert r["time"]["train"] > 0 and r["time"]["measure"] < r["time"]["train"]
    s = rep["summary"]
    assert s["measure_source"] == "track" and s["tracked_rounds"] == 2
    assert "counted their entropies during their last fine-tune epoch" in summary_text(rep)
    assert "--measure track:" not in log  # nothing fell back


def test_no_dense_epochs_falls_back_to_a_pass_for_round_0(tmp_path, monkeypatch, capsys):
    spy = _Spy(monkeypatch)
    out = tmp_path / "run"
    assert main(["prune", *SMALL, "--dense-epochs", "0", "--epochs", "1", "--rounds", "1", "--measure", "track",
                 "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert spy.passes == 1 and len(spy.trackers) == 1
    r0, r1 = _report(out)["rounds"]
    assert r0["measure_source"] == "pass" and "--dense-epochs 0" in r0["measure_note"]
    assert r0["measure_stopped_early"] is not None  # a stop='decided' pass, as --measure auto
    assert r1["measure_source"] == "track" and "measure_note" not in r1
    assert "--measure track: --dense-epochs 0 leaves no dense epoch to track" in log


def test_resumed_run_measures_instead_of_using_lost_counts(tmp_path, monkeypatch, capsys):
    """Killed after round 1's last (tracked) epoch was checkpointed but before the round ended: the
    counts died with the process, so the resumed run measures with a pass and says why."""
    out = tmp_path / "run"
    finish = run_module.Run._finish_round

    def killed(self, rnd, plan):
        if rnd == 1:
            raise KeyboardInterrupt  # as a kill right after the epoch's checkpoint
        return finish(self, rnd, plan)

    monkeypatch.setattr(run_module.Run, "_finish_round", killed)
    args = [*SMALL, "--dense-epochs", "1", "--epochs", "1", "--rounds", "1", "--measure", "track", "--no-collapse"]
    assert main(["prune", *args, "--out", str(out)]) == 130
    monkeypatch.setattr(run_module.Run, "_finish_round", finish)
    spy = _Spy(monkeypatch)
    capsys.readouterr()
    assert main(["prune", "--resume", str(out), "--no-progress"]) == 0
    log = capsys.readouterr().out
    assert spy.passes == 1 and spy.trackers == []  # no epoch left to run: nothing tracked, one pass
    r0, r1 = _report(out)["rounds"]
    assert r0["measure_source"] == "track"
    assert r1["measure_source"] == "pass" and "resumed" in r1["measure_note"]
    assert "--measure track: the run was resumed" in log


def test_resumed_mid_round_tracks_the_whole_last_epoch_again(tmp_path, monkeypatch):
    """Killed after round 1's first epoch: the resumed run re-runs the last epoch from its start,
    inside a tracker, so the counts are complete and no pass is needed."""
    out = tmp_path / "run"
    checkpoint = run_module.Run._checkpoint

    def killed(self, opt=None, sch=None):
        checkpoint(self, opt, sch)
        if self.state["phase"] == "round" and self.state["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(run_module.Run, "_checkpoint", killed)
    args = [*SMALL, "--dense-epochs", "1", "--epochs", "2", "--rounds", "1", "--measure", "track", "--no-collapse"]
    assert main(["prune", *args, "--out", str(out)]) == 130
    monkeypatch.setattr(run_module.Run, "_checkpoint", checkpoint)
    spy = _Spy(monkeypatch)
    assert main(["prune", "--resume", str(out), "--no-progress"]) == 0
    assert spy.passes == 0 and len(spy.trackers) == 1
    r1 = _report(out)["rounds"][1]
    assert r1["measure_source"] == "track" and r1["measure_batches"] == spy.trackers[0].batches


def test_easier_tracks_its_steps(tmp_path, monkeypatch):
    spy = _Spy(monkeypatch)
    out = tmp_path / "run"
    assert main(["prune", *SMALL, "--method", "easier", "--dense-epochs", "1", "--epochs", "1", "--rounds", "2",
                 "--max-drop", "0.99", "--measure", "track", "--no-collapse", "--out", str(out)]) == 0
    rounds = _report(out)["rounds"]
    assert len(rounds) == 3 and [r["measure_source"] for r in rounds] == ["track"] * 3
    assert len(spy.trackers) == 3 and spy.passes == 0
    # each step removed the lowest-entropy live site of the previous round's tracked statistics
    for prev, cur in zip(rounds, rounds[1:]):
        site = cur["removed_sites"][0]
        live = {n: h for n, h in prev["entropy"].items()}
        assert live[site] == min(live.values())


def test_unknown_measure_mode_is_a_usage_error(tmp_path, capsys):
    assert main(["prune", *SMALL, "--measure", "training", "--out", str(tmp_path / "x")]) == 2
    assert "invalid choice: 'training' (choose from 'full', 'auto', 'track')" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_track_under_torchrun_sums_the_ranks_counts(tmp_path):
    """Two gloo ranks each count their own shard of the tracked epoch; the statistics are summed
    over the ranks (as a measurement pass's are): every training sample is counted once."""
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    args = ["prune", *SMALL, "--dense-epochs", "1", "--epochs", "1", "--rounds", "1", "--measure", "track",
            "--no-collapse"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*args, "--out", str(one)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "egp_fast.cli", *args, "--out", str(two)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _report(one)["rounds"], _report(two)["rounds"]
    for ra, rb in zip(a, b, strict=True):
        assert ra["measure_source"] == rb["measure_source"] == "track"
        # 2 ranks x the same number of per-rank batches (half the global batch each)
        assert rb["measure_batches"] == 2 * ra["measure_batches"]
        for sa, sb in zip(ra["stats"]["sites"], rb["stats"]["sites"], strict=True):
            assert sa["name"] == sb["name"] and sa["samples"] == sb["samples"] > 0
            assert sa["observations"] == sb["observations"]
    assert "--measure track:" not in proc.stdout
