"""The time split of a run: every round's seconds divided into its phases in report.json, the totals
and EGP's own share of a fine-tune epoch in the summary (egp_fast.cli.timing)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from egp_fast.cli.commands import main
from egp_fast.cli.report import round_line, summary_text
from egp_fast.cli.timing import PHASES, PhaseClock, round_split, time_lines, time_summary

KEYS = set(PHASES) | {"other"}


def test_clock_adds_up_and_names_its_phases():
    clock, times = PhaseClock(torch.device("cpu")), {}
    for _ in range(3):
        with clock.phase(times, "measure"):
            sum(range(1000))
    assert set(times) == {"measure"} and times["measure"] > 0
    with pytest.raises(KeyError, match="unknown phase 'measuring'"):
        with clock.phase(times, "measuring"):
            pass
    # a phase that raises still counts
    with pytest.raises(ValueError):
        with clock.phase(times, "train"):
            raise ValueError("boom")
    assert times["train"] >= 0


def test_round_split_fills_every_phase_and_other_is_the_rest():
    split = round_split({"train": 3.0, "measure": 0.5, "select": 0.25}, 4.0)
    assert set(split) == KEYS
    assert split["other"] == pytest.approx(0.25) and sum(split.values()) == pytest.approx(4.0)
    assert split["collapse"] == 0.0
    # more in the phases than the wall time (clocks read at different moments): other is 0, never negative
    assert round_split({"train": 5.0}, 4.0)["other"] == 0.0


def test_summary_totals_and_egp_share():
    rounds = [{"round": 0, "time": {"setup": 2.0, "train": 10.0, "measure": 1.0}},
              {"round": 1, "time": {"train": 30.0, "measure": 1.0, "select": 0.2, "masks": 0.3}},
              {"round": 2, "time": {"train": 20.0, "measure": 0.5, "select": 0.1, "masks": 0.1}}]
    s = time_summary(rounds, {"collapse": 4.0, "latency": 3.0}, epochs=5)
    assert s["time"]["train"] == 60.0 and s["time"]["measure"] == 2.5 and s["time"]["collapse"] == 4.0
    assert s["egp_seconds_per_round"] == pytest.approx((1.5 + 0.7) / 2)
    assert s["finetune_epoch_seconds"] == pytest.approx(50.0 / 10)
    assert s["egp_share_of_epoch"] == pytest.approx(1.1 / 5.0)
    text = "\n".join(time_lines({**s, "world_size": 2}))
    assert "time (rank 0 of 2): " in text and "collapse 4.0 s" in text and "22.0% of one fine-tune epoch" in text
    # no fine-tune epochs: no share (nothing to compare with)
    assert "egp_share_of_epoch" not in time_summary(rounds, None, epochs=0)
    assert time_lines({}) == []


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("timing") / "run"
    args = ["prune", "--width", "4", "--image-size", "8", "--limit", "120", "--dense-epochs", "1", "--epochs", "2",
            "--rounds", "1", "--batch-size", "32", "--eval-batch-size", "64", "--measure", "auto",
            "--no-progress", "--out", str(out)]
    assert main(args) == 0
    with open(out / "metrics.csv") as f:
        epochs = [{"round": int(r["round"]), "phase": r["phase"], "seconds": float(r["seconds"])}
                  for r in csv.DictReader(f)]
    return json.loads((out / "report.json").read_text()), epochs


def test_report_splits_every_round_and_the_end(run):
    run, epoch_rows = run
    rounds = run["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    for r in rounds:
        t = r["time"]
        assert set(t) == KEYS and all(v >= 0 for v in t.values()), t
        assert sum(t.values()) == pytest.approx(r["seconds"], rel=1e-9, abs=1e-9)
    r0, r1 = rounds[0]["time"], rounds[1]["time"]
    assert r0["setup"] > 0 and r0["train"] > 0 and r0["eval"] > 0 and r0["measure"] > 0
    assert r0["select"] == r0["masks"] == 0  # nothing is pruned in the dense round
    assert r1["setup"] == 0 and r1["train"] > 0 and r1["eval"] > 0 and r1["measure"] > 0
    assert r1["select"] > 0 and r1["masks"] > 0
    # the train phase holds the round's epochs (their own clocks start inside it)
    epochs = [e["seconds"] for e in epoch_rows if e["round"] == 1 and e["phase"] == "finetune"]
    assert len(epochs) == 2 and sum(epochs) <= r1["train"]
    s = run["summary"]
    fin = s["time_final"]
    assert set(fin) == KEYS and fin["collapse"] > 0 and fin["latency"] > 0 and fin["save"] > 0
    assert fin["train"] == 0  # no --fold-epochs
    # totals over the rounds and the end, adding up to the wall time
    for k in KEYS:
        assert s["time"][k] == pytest.approx(r0[k] + r1[k] + fin[k], abs=1e-9)
    assert sum(s["time"].values()) == pytest.approx(s["wall_seconds"], rel=1e-6)
    egp = r1["measure"] + r1["select"] + r1["masks"]
    assert s["egp_seconds_per_round"] == pytest.approx(egp)
    assert s["finetune_epoch_seconds"] == pytest.approx(r1["train"] / 2)
    assert s["egp_share_of_epoch"] == pytest.approx(egp / (r1["train"] / 2))
    text = summary_text(run)
    assert "time: setup" in text and "collapse" in text and "of one fine-tune epoch" in text
    assert "(train " in round_line(rounds[1])

