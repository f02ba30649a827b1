"""Smoke test of the fidelity benchmark (benchmarks/fidelity.py --quick) and of its pieces.

The full ``--quick`` run (two tiny models, three methods, every collapsed model reloaded) takes
about two CPU-minutes, so it is marked slow; the pieces it is built from are tested fast.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _fidelity():
    spec = importlib.util.spec_from_file_location("fidelity", ROOT / "benchmarks" / "fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_options_and_errors():
    fid = _fidelity()
    args = fid.parse_args(["--quick", "--out", "/tmp/x/fidelity"])
    assert args.seeds == [0] and args.jobs == 1 and args.rounds == 1 and args.easier_steps == 1
    assert args.cache == "/tmp/x/fidelity_cache"
    assert args.fold_epochs == 1 and args.task == "digits"
    full = fid.parse_args([])
    assert (full.seeds, full.dense_epochs, full.ft_epochs, full.rounds, full.jobs) == ([0, 1, 2], 15, 8, 4, 2)
    assert full.methods == ["egp", "imp", "easier"] and full.models == ["resnet", "vit"]
    assert full.fold_epochs == 4 and full.out.endswith("fidelity")
    hard = fid.parse_args(["--task", "digits-hard", "--models", "mobilenet", "--methods", "easier-latency"])
    assert hard.out.endswith("fidelity_hard") and hard.cache.endswith("fidelity_hard_cache")
    for bad in (["--val-fraction", "1.5"], ["--rounds", "0"], ["--max-drop", "-0.1"], ["--models", "lenet"],
                ["--fold-epochs", "-1"], ["--target-speedup", "0.9"], ["--task", "mnist"]):
        with pytest.raises(SystemExit):
            fid.parse_args(bad)


def test_interleaved_latency_ratio_tracks_the_slower_model(monkeypatch):
    # Planted timings on a fake clock (the speed of real models belongs in the benchmarks).
    from _clock import UNIT, Costly, FakeClock

    from egp_fast.folding import latency as collapse_latency
    fid = _fidelity()
    clock = FakeClock().install(monkeypatch, collapse_latency)
    fast = Costly(clock, lambda bs, i: UNIT * bs)
    slow = Costly(clock, lambda bs, i: 40 * UNIT * bs)
    lat = fid.interleaved_latency(fast, slow, torch.randn(4, 8), rounds=3, min_run_ms=5)
    assert lat["ratio"] == 40.0 and lat["ratio_min"] == lat["ratio_max"] == 40.0
    assert lat["a_ms"] == pytest.approx(1e3 * 4 * UNIT) and lat["b_ms"] == pytest.approx(1e3 * 160 * UNIT)
    # Five rounds of planted costs (after one warm-up and one calibration forward each): the
    # ratio is 1 / the median of the paired a / b (1/40, 1/40, 1/30, 1/20, 1/20), not the ratio
    # of the medians (40 / 1), and its spread the inverted interquartile range of a / b.
    a_rounds, b_rounds = [1, 1, 2, 2, 1], [20, 40, 80, 40, 30]
    fast = Costly(clock, lambda bs, i: UNIT * (1 if i < 2 else a_rounds[i - 2]))
    slow = Costly(clock, lambda bs, i: UNIT * (1 if i < 2 else b_rounds[i - 2]))
    lat = fid.interleaved_latency(fast, slow, torch.randn(2, 8), rounds=5, min_run_ms=0)
    assert lat["a_ms"] == pytest.approx(1e3 * UNIT) and lat["b_ms"] == pytest.approx(1e3 * 40 * UNIT)
    assert lat["ratio"] == pytest.approx(30.0)
    assert lat["ratio_min"] == pytest.approx(20.0) and lat["ratio_max"] == pytest.approx(40.0)


def test_save_and_reload_detects_a_mismatch(monkeypatch):
    fid = _fidelity()
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    x = torch.randn(64, 4)
    for fmt in ("pickle", "export"):
        r = fid.save_and_reload(net, x[:2], x, fmt)
        assert r["ok"] and r["max_rel_diff"] == 0.0, r
    # a file that loads back as a different model must be caught
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    monkeypatch.setattr(torch, "load", lambda *a, **k: other)
    r = fid.save_and_reload(net, x[:2], x, "pickle")
    assert not r["ok"] and r["max_rel_diff"] > 1e-3


def test_compare_on_counts_changed_predictions():
    fid = _fidelity()
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(4, 3)
    x = torch.randn(50, 4)
    y = torch.zeros(50, dtype=torch.long)
    same = fid.compare_on(a, a, [(x, y)])
    assert same["relative_deviation"] == 0.0 and same["predictions_changed"] == 0.0
    diff = fid.compare_on(a, b, [(x, y)])
    assert diff["relative_deviation"] > 0
    with torch.no_grad():
        expect = float((a(x).argmax(1) != b(x).argmax(1)).float().mean())
    assert diff["predictions_changed"] == pytest.approx(expect)


def _rows():
    base = {"model": "resnet", "sites_total": 17, "dense_accuracy": 0.98, "variant": "exact"}
    rows = []
    for seed, (egp_sites, easier) in enumerate([(2, [(1, 3, 0.98), (2, 6, 0.975), (3, 9, 0.95)]),
                                                 (3, [(1, 4, 0.98), (2, 8, 0.90)])]):
        rows.append(dict(base, seed=seed, method="dense", iteration=0, sites_removed=0, accuracy=0.98))
        rows.append(dict(base, seed=seed, method="egp", iteration=1, sites_removed=0, accuracy=0.97))
        rows.append(dict(base, seed=seed, method="egp", iteration=2, sites_removed=egp_sites, accuracy=0.96))
        for it, sites, acc in easier:
            rows.append(dict(base, seed=seed, method="easier", iteration=it, sites_removed=sites, accuracy=acc,
                             selected=it == 2))
    for r in rows:
        r["drop_pt"] = 100 * (r["dense_accuracy"] - r["accuracy"])
    return rows


def test_selection_and_best_within():
    fid = _fidelity()
    rows = _rows()
    egp = fid.selected_rows(rows, "resnet", "egp")
    assert [r["sites_removed"] for r in egp] == [2, 3]  # the last round of each seed
    easier = fid.selected_rows(rows, "resnet", "easier")
    assert [r["sites_removed"] for r in easier] == [6, 8]  # the step the loop returned
    assert [fid.best_within(rows, "resnet", "easier", s) for s in (0, 1)] == [6, 4]
    # a loop that returned the dense model: the dense row stands for it
    for r in rows:
        if r["method"] == "easier" and r["seed"] == 1:
            r["selected"] = False
    assert [r["sites_removed"] for r in fid.selected_rows(rows, "resnet", "easier")] == [6, 0]
    # an unfinished run (rows saved so far): the loop's rule on validation picks the step
    for r in rows:
        if r["method"] == "easier" and r["seed"] == 1:
            r["partial"], r["dense_val_accuracy"] = True, 0.98
            r["val_accuracy"] = {1: 0.975, 2: 0.95}[r["iteration"]]
    assert [r["sites_removed"] for r in fid.selected_rows(rows, "resnet", "easier")] == [6, 4]


def test_validation_stop_for_rounds_methods():
    fid = _fidelity()
    rows = _rows()
    for r in rows:
        r["dense_val_accuracy"] = 0.98
        # seed 0: round 1 within 1 pt on validation, round 2 not; seed 1: round 1 already outside,
        # and round 2 back within does not count (the stop is at the first round outside)
        r["val_accuracy"] = {(0, 1): 0.975, (0, 2): 0.96, (1, 1): 0.96, (1, 2): 0.99}.get((r["seed"], r["iteration"]), 0.98)
        r["longest_path"] = 18 - r["sites_removed"]
    sel = fid.validation_stop_rows(rows, "resnet", "egp")
    assert [(r["iteration"], r["sites_removed"], r["method"]) for r in sel] == [(1, 0, "egp"), (0, 0, "egp")]
    for r in rows:
        if r["method"] == "egp" and r["seed"] == 0 and r["iteration"] == 1:
            r["sites_removed"], r["longest_path"] = 1, 17
    report = {"rows": rows, "config": {"models": ["resnet"], "methods": ["egp", "easier"], "max_drop": 0.01}}
    lines = fid._validation_stop_lines(report)
    row = next(line for line in lines if line.startswith("| resnet | egp |"))
    assert [c.strip() for c in row.split("|")[1:-1]] == ["resnet", "egp", "1: 1, +1.0; 0: 0, +0.0", "0.5/17", "+0.5", "17.5"]
    assert not any(line.startswith("| resnet | easier |") for line in lines)  # easier has its own stop


def test_mobilenet_takes_one_grey_channel_and_runs_at_224():
    fid = _fidelity()
    net = fid.build(fid.model_recipes(quick=True)["mobilenet"], 32).eval()
    assert net.features[0][0].in_channels == 1
    with torch.no_grad():
        assert net(torch.randn(2, 1, 32, 32)).shape == (2, 10)
        assert net(torch.randn(1, 1, 224, 224)).shape == (1, 10)


def test_linear_baseline_is_chosen_on_validation():
    fid = _fidelity()
    splits = fid.Splits(0, 0.2, 300, 64, "digits")
    lin = fid.linear_baseline(splits, cs=(1e-4, 1.0))
    # a nearly unregularised logistic regression fits digits; C=1e-4 barely moves off uniform
    assert lin["C"] == 1.0 and lin["per_C"][1.0] > lin["per_C"][1e-4]
    assert lin["val_accuracy"] == lin["per_C"][1.0] and 0.8 < lin["test_accuracy"] <= 1.0


def test_digits_hard_splits_keep_originals_apart():
    fid = _fidelity()
    splits = fid.Splits(1, 0.1, None, 64, "digits-hard")
    assert splits.sizes() == {"train": len(splits.train), "val": len(splits.val), "test": 1440}
    assert len(splits.val) >= 400 and splits.example.shape == (2, 1, 32, 32)
    assert not set(splits.train.groups.tolist()) & set(splits.val.groups.tolist())


def test_easier_latency_without_the_objective_fails_clearly(monkeypatch):
    import egp_fast
    fid = _fidelity()

    def old_prune(model, data, *, method="egp", evaluate=None, max_drop=None, finetune=None, iterations=9,
                  progress=True):
        return "ran"

    monkeypatch.setattr(egp_fast, "prune", old_prune)
    cfg = {"target_speedup": 1.5}
    splits = type("S", (), {"measure_loader": []})()
    assert fid._prune_easier("easier", None, splits, cfg, iterations=2) == "ran"
    with pytest.raises(RuntimeError, match="objective='latency'.*--methods egp imp easier"):
        fid._prune_easier("easier-latency", None, splits, cfg, iterations=2)
    seen = {}

    def new_prune(model, data, **kw):
        seen.update(kw)
        return "latency"

    monkeypatch.setattr(egp_fast, "prune", new_prune)
    assert fid._prune_easier("easier-latency", None, splits, cfg, iterations=2) == "latency"
    assert seen["objective"] == "latency" and seen["target_speedup"] == 1.5 and seen["method"] == "easier"


def test_fold_finetune_columns_in_the_table():
    fid = _fidelity()
    rows = []
    for r in _rows():
        r.update(dense_val_accuracy=0.98, val_accuracy=r["accuracy"], longest_path=10, longest_path_uncollapsed=18,
                 params=1e5, flops=1e6, latency_ratio_b1=0.9, latency_ratio_b64=0.8, exact=True,
                 relative_deviation_test=0.0, reload={"ok": True})
        rows.append(r)
        if r["method"] == "easier" and r.get("selected"):
            rows.append(dict(r, variant="always_inexact", accuracy=0.5, drop_pt=48.0, longest_path=3,
                             fold_finetune_accuracy=0.9, fold_finetune_drop_pt=8.0, latency_ratio_224_b1=0.5,
                             latency_ratio_224_b8=0.25, exact=False))
    report = {"rows": rows, "errors": [], "argv": [], "date": "2026-12-05 00:00 UTC", "wall_s": 60.0,
              "config": {"task": "digits-hard", "models": ["resnet"], "methods": ["egp", "easier"],
                         "max_drop": 0.01, "jobs": 1, "threads": 1, "dense_epochs": 1, "ft_epochs": 1,
                         "rounds": 1, "seeds": [0, 1], "fold_epochs": 3},
              "machine": {"cpu": "cpu", "cores": 2, "torch": "2"}, "load_start": [1, 1, 1], "load_end": [1, 1, 1],
              "splits": {"train": 1, "val": 1, "test": 1},
              "linear": {"C": 0.1, "val_accuracy": 0.12, "test_accuracy": 0.125}}
    md = fid.markdown(report)
    assert "(digits-hard 32x32)" in md and "fine-tuned for 3 epochs" in md
    assert "scores 12.5% on test" in md and "85.5 points above it" in md
    inexact = next(line for line in md.splitlines() if line.startswith("| resnet | easier | always_inexact |"))
    cells = [c.strip() for c in inexact.split("|")[1:-1]]
    assert cells[4:7] == ["50.0", "+48.0", "90.0 (+8.0)"]  # right after the fold, then after fold-ft
    assert cells[14:16] == ["0.50x", "0.25x"]
    exact = next(line for line in md.splitlines() if line.startswith("| resnet | egp | exact |"))
    assert [c.strip() for c in exact.split("|")[1:-1]][6] == "-"


@pytest.mark.slow
def test_quick_run_writes_every_output(tmp_path):
    fid = _fidelity()
    out = tmp_path / "fidelity"
    rc = fid.main(["--quick", "--out", str(out)])
    assert rc == 0
    report = json.loads((tmp_path / "fidelity.json").read_text())
    assert report["errors"] == []
    rows = report["rows"]
    for model in ("resnet", "vit"):
        methods = {r["method"] for r in rows if r["model"] == model}
        assert methods == {"dense", "egp", "imp", "easier"}, (model, methods)
        for method in ("egp", "imp", "easier"):
            variants = {r["variant"] for r in rows if r["model"] == model and r["method"] == method}
            assert variants == {"exact", "always_inexact"}, (model, method)
        inexact = [r for r in rows if r["model"] == model and r["variant"] == "always_inexact"]
        assert all(0 <= r["fold_finetune_accuracy"] <= 1 and r["fold_epochs"] == 1 for r in inexact)
        finals = [r for r in rows if r["model"] == model and (r.get("selected") or r["method"] == "dense")]
        assert all(("latency_ratio_224_b8" in r) == (model == "resnet") for r in finals)
    for r in rows:
        assert r["reload"]["ok"], r
        for key in ("accuracy", "sites_removed", "longest_path", "params", "flops", "latency_ratio_b1",
                    "latency_ratio_b64", "exact", "wall_s"):
            assert r[key] is not None, key
        if r["variant"] == "exact":
            assert r["exact"] and r["relative_deviation_test"] < 1e-4, r
        if r.get("selected") or r["method"] == "dense":
            assert r["reload_export"]["ok"], r
    assert sum(bool(r.get("selected")) for r in rows if r["method"] == "easier") <= 2 * 2
    md = (tmp_path / "fidelity.md").read_text()
    assert "| resnet | easier | always_inexact |" in md and "| vit | egp | exact |" in md
    assert "Linear baseline: a multinomial logistic regression" in md
    assert (tmp_path / "fidelity.png").stat().st_size > 10_000
    # --report-only rebuilds the same table from the cache alone
    (tmp_path / "fidelity.md").unlink()
    assert fid.main(["--quick", "--out", str(out), "--report-only"]) == 0
    again = (tmp_path / "fidelity.md").read_text()
    assert again.split("| model |", 1)[1].split("Reloads")[0] == md.split("| model |", 1)[1].split("Reloads")[0]
