"""Run outputs: metrics.csv, report.json, tables, plots and `egp-fast report` run comparison."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest
import torch

from egp_fast.cli.commands import main
from egp_fast.errors import CheckpointError
from egp_fast.cli.plots import plot_entropy_heatmap, plot_sparsity_curves
from egp_fast.cli.report import (
    compare_table,
    load_run,
    round_table,
    summary_text,
    write_json,
    write_metrics_csv,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _report(method: str, zeros: list[int], accs: list[float]) -> dict:
    sites = ["relu", "layer1.0.relu1", "layer1.0.relu2"]
    rounds = []
    for i, (z, a) in enumerate(zip(zeros, accs)):
        ent = {s: (0.0 if k < z else 0.9 - 0.1 * i) for k, s in enumerate(sites)}
        rounds.append({"round": i, "sparsity": 1 - 0.5 ** i, "accuracy": a, "n_sites": 3, "n_zero": z,
                       "zero_entropy_sites": sites[:z], "entropy": ent, "seconds": 1.5 + i})
    return {"config": {"method": method, "data": "digits", "model": "cifar_resnet18", "width": 16},
            "rounds": rounds,
            "summary": {"acc_dense": accs[0], "acc_pruned": accs[-1], "acc_collapsed": accs[-1],
                        "sparsity": rounds[-1]["sparsity"], "zero_sites": zeros[-1], "sites_before": 17,
                        "sites_after": 14, "depth_before": 18, "depth_after": 15, "latency_batch": 64,
                        "latency_pruned_ms": 40.0, "latency_collapsed_ms": 30.0, "device": "cpu",
                        "wall_seconds": 61.0}}


def _run_dir(path, report):
    path.mkdir(parents=True)
    write_json(path / "config.json", {"options": report["config"]})
    write_json(path / "report.json", report)
    return path


def test_metrics_csv_rewritten_whole(tmp_path):
    p = tmp_path / "metrics.csv"
    rows = [{"phase": "dense", "round": 0, "epoch": 1, "test_acc": 0.5, "seconds": 1.0}]
    write_metrics_csv(p, rows)
    write_metrics_csv(p, rows + [{"phase": "finetune", "round": 1, "epoch": 1, "test_acc": 0.75}])
    with open(p) as f:
        got = list(csv.DictReader(f))
    assert [r["phase"] for r in got] == ["dense", "finetune"]
    assert float(got[1]["test_acc"]) == 0.75 and got[1]["seconds"] == ""


def test_write_json_is_strict_json(tmp_path):
    write_json(tmp_path / "r.json", {"a": float("nan"), "b": torch.tensor([1, 2]), "c": (1.5, math.inf)})
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text) == {"a": None, "b": [1, 2], "c": [1.5, None]}
    assert "NaN" not in text and "Infinity" not in text


def test_round_table_and_summary():
    rep = _report("egp", [0, 1, 2], [0.99, 0.98, 0.96])
    table = round_table(rep["rounds"]).splitlines()
    assert table[0].split() == ["round", "sparsity", "accuracy", "zero-H", "sites", "time"]
    assert table[3].split() == ["2", "75.0%", "96.0%", "2/3", "3.5s"]
    s = summary_text(rep)
    assert "accuracy: dense 99.0% -> pruned 96.0% -> collapsed 96.0%" in s
    assert "sites: 17 -> 14" in s and "18 -> 15" in s
    assert "pruned 40.00 ms -> collapsed 30.00 ms" in s and "wall time: 61.0 s" in s
    assert "(width 16)" in s


def test_summary_without_collapse():
    rep = _report("imp", [0, 0], [0.99, 0.98])
    del rep["summary"]["acc_collapsed"], rep["summary"]["sites_after"], rep["summary"]["latency_collapsed_ms"]
    s = summary_text(rep)
    assert "collapsed" not in s and "pruned 98.0%" in s


def test_compare_table_side_by_side(tmp_path):
    egp = load_run(_run_dir(tmp_path / "egp-a", _report("egp", [0, 1, 3], [0.99, 0.98, 0.96])))
    imp = load_run(_run_dir(tmp_path / "imp-a", _report("imp", [0, 0], [0.99, 0.99])))
    lines = compare_table([egp, imp]).splitlines()
    assert "egp:egp-a" in lines[0] and "imp:imp-a" in lines[0]
    assert lines[4].split()[:4] == ["2", "75.0%", "96.0%", "3/3"] and lines[4].split()[-1] == "-"
    assert lines[-1].startswith("final")


def test_plots_are_pngs(tmp_path):
    rep = _report("egp", [0, 1, 2], [0.99, 0.98, 0.96])
    del rep["rounds"][0]["entropy"]["layer1.0.relu2"]  # a site missing in one round: a blank cell
    plot_entropy_heatmap(rep, tmp_path / "h.png")
    runs = [{"name": "a", "config": rep["config"], "report": rep},
            {"name": "b", "config": {"method": "imp"}, "report": _report("imp", [0, 0], [0.99, 0.99])}]
    plot_sparsity_curves(runs, tmp_path / "c.png")
    for p in ("h.png", "c.png"):
        data = (tmp_path / p).read_bytes()
        assert data[:8] == PNG and len(data) > 2000


def test_load_run_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not an egp-fast run directory"):
        load_run(tmp_path)
    d = _run_dir(tmp_path / "r", _report("egp", [0], [0.9]))
    (d / "report.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_run(d)
    os.remove(d / "report.json")
    assert load_run(d)["report"] is None


def test_report_command_compares_runs(tmp_path, capsys):
    a = _run_dir(tmp_path / "runs" / "egp-x", _report("egp", [0, 1, 3], [0.99, 0.98, 0.96]))
    b = _run_dir(tmp_path / "runs" / "imp-x", _report("imp", [0, 0, 0], [0.99, 0.99, 0.98]))
    before = {p: (p.read_bytes()) for d in (a, b) for p in (d / "config.json", d / "report.json")}
    out = tmp_path / "cmp"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "== comparison" in text and "egp:egp-x" in text and "collapsed 96.0%" in text
    assert (out / "compare.png").read_bytes()[:8] == PNG
    for d in (a, b):
        assert (d / "entropy_heatmap.png").read_bytes()[:8] == PNG
        assert (d / "sparsity_curves.png").read_bytes()[:8] == PNG
    assert all(p.read_bytes() == v for p, v in before.items())  # the runs' records are untouched
    # default comparison directory: next to the first run
    assert main(["report", str(a), str(b)]) == 0
    assert any(n.startswith("compare-") for n in os.listdir(tmp_path / "runs"))


def test_report_command_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an egp-fast run directory" in err[0]
    a = _run_dir(tmp_path / "a", _report("egp", [0], [0.9]))
    b = _run_dir(tmp_path / "b", _report("imp", [0], [0.9]))
    assert main(["report", str(a), str(b), "--out", str(a)]) == 2  # never into a run directory
    assert "is a run directory" in capsys.readouterr().err


def test_round_table_extra_columns_for_validation_easier_and_measure_auto():
    rounds = [{"round": 0, "sparsity": 0.0, "accuracy": 0.97, "val_accuracy": 0.986, "n_sites": 17, "n_zero": 0,
               "seconds": 2.0, "n_removed": 0, "measure_batches": 6, "measure_stopped_early": False},
              {"round": 1, "sparsity": 0.0, "accuracy": 0.975, "val_accuracy": 0.993, "n_sites": 17, "n_zero": 0,
               "seconds": 1.0, "n_removed": 1, "measure_batches": 2, "measure_stopped_early": True}]
    table = round_table(rounds).splitlines()
    assert table[0].split()[-3:] == ["acc", "removed", "batches"] and "val acc" in table[0]
    assert table[2].split() == ["1", "0.0%", "97.5%", "0/17", "1.0s", "99.3%", "1", "2"]
    # records without those keys keep the plain table
    assert "val acc" not in round_table([{"round": 0, "sparsity": 0.0, "accuracy": 0.9}])


def test_summary_reports_evidence_interleaved_latency_and_fold_finetune():
    rep = _report("egp", [0, 1], [0.99, 0.98])
    s = rep["summary"]
    s.update(latency_pruned_ms=31.4, latency_collapsed_ms=26.3, latency_speedup=1.19, latency_speedup_iqr=[1.1, 1.25],
             latency_inside_noise=False, latency_rounds=15, latency_b1_pruned_ms=4.0, latency_b1_collapsed_ms=3.9,
             latency_b1_speedup=1.02, latency_b1_speedup_iqr=[0.95, 1.1], latency_b1_inside_noise=True,
             latency_b1_rounds=15, val_acc_dense=0.986, val_acc_pruned=0.979, max_flip=0.01, confidence=0.95,
             evidence=[{"site": "layer1.0.relu1", "samples": 1294, "flip_bound": 0.0023, "held_out_samples": 143,
                        "held_out_flipped": 0, "held_out_flip_rate": 0.0}],
             left_weak=[{"site": "layer4.1.relu1", "reason": "seen on 180 samples: flip bound 1.65% > 1%"}],
             acc_fold_before=0.97, acc_fold_after=0.985)
    rep["config"]["fold_epochs"] = 2
    text = summary_text(rep)
    assert "pruned 31.40 ms -> collapsed 26.30 ms, 1.19x (IQR 1.10-1.25)" in text
    assert "latency (batch 1, cpu, interleaved x15)" in text and "1.02x (IQR 0.95-1.10): inside the noise" in text
    assert "flip bound <= 0.23% at 95% confidence (>= 1294 samples)" in text
    assert "held-out check: 0 flipped sample(s) over 143" in text
    assert "layer4.1.relu1: seen on 180 samples" in text
    assert "validation (held out from training): dense 98.6% -> pruned 97.9%" in text
    assert "fold-finetune (2 epochs on the collapsed model): 97.0% -> 98.5%" in text


def test_summary_of_an_easier_run():
    rep = _report("easier", [0, 0, 0], [0.97, 0.975, 0.972])
    rep["config"]["max_drop"] = 0.01
    rep["summary"].update(best_round=2, stopped="validation accuracy 97.2% is more than 1 pt below the dense 98.6%",
                          easier_removed=["layer1.1.relu2", "layer1.0.relu2"],
                          evidence=[{"site": "layer1.1.relu2", "samples": None, "flip_bound": None},
                                    {"site": "layer1.0.relu2", "samples": None, "flip_bound": None}])
    text = summary_text(rep)
    assert "-> sites removed 97.2%" in text
    assert "easier: kept step 2 with 2 sites removed (max drop 1 pt); stopped: validation accuracy" in text
    assert "folded: 2 site(s) removed earlier by the method" in text and "sparsity:" not in text
    assert "speed-up" not in text  # objective "sites": no speed-up figures
    rep["summary"].update(easier_predicted_speedup=1.291, easier_measured_speedup=None)
    assert "stopped: validation accuracy" in summary_text(rep)
    assert "; speed-up predicted 1.29x, measured -" in summary_text(rep)
    rep["summary"]["easier_measured_speedup"] = 1.5
    assert "; speed-up predicted 1.29x, measured 1.50x" in summary_text(rep)
