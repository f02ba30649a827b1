"""The egp-fast command in-process: option errors, a tiny end-to-end run and its outputs, resume checks."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

from egp_fast import load_pruned_state_dict
from egp_fast.cli.commands import build_parser, main
from egp_fast.cli.data import load_data
from egp_fast.cli.loader import make_loader
from egp_fast.cli.models import build_model
from egp_fast.cli.train import evaluate

# A small run that learns (dense ~85-90% on 8x8 digits), so "accuracy equal after reload/resume"
# compares real predictions, not a constant guess. ~15 s of compute on one core.
TINY = ["--width", "8", "--image-size", "8", "--limit", "500", "--dense-epochs", "4", "--epochs", "2",
        "--lr", "0.03", "--rounds", "2", "--batch-size", "32", "--eval-batch-size", "128", "--no-progress",
        "--no-latency"]
# Option checks that fail before any training can use the cheapest settings.
QUICK = ["--width", "4", "--image-size", "8", "--limit", "120", "--dense-epochs", "1", "--epochs", "1",
         "--rounds", "2", "--batch-size", "32", "--eval-batch-size", "64", "--no-progress", "--no-latency"]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("egp-fast: error: ")
    assert "Traceback" not in err[0]
    return err[0]


def _snapshot(d):
    return {e.name: (e.stat().st_mtime_ns, e.stat().st_size) for e in os.scandir(d)}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny EGP run shared by the output checks."""
    out = tmp_path_factory.mktemp("runs") / "egp"
    assert main(["prune", *TINY, "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    # Well above chance (10%): the run learned, so equal accuracies below mean equal predictions.
    assert rep["summary"]["acc_dense"] > 0.6 and rep["summary"]["acc_pruned"] > 0.5
    return out


# ------------------------------------------------------------------ usage and option errors
def test_parser_defaults_are_the_demo():
    ns = build_parser().parse_args(["prune"])
    assert vars(ns) == {"command": "prune"}  # defaults are filled later, so explicit options are known
    from egp_fast.cli.commands import DEFAULTS, _resolve_derived

    cfg = _resolve_derived(DEFAULTS)
    assert (cfg["data"], cfg["model"], cfg["method"], cfg["rounds"], cfg["epochs"], cfg["step"]) == (
        "digits", "cifar_resnet18", "egp", 4, 8, 0.5)
    assert (cfg["optimizer"], cfg["dense_lr"], cfg["lr"], cfg["width"], cfg["val_fraction"]) == (
        "sgd", 0.1, 0.01, 16, 0.1)
    easier = _resolve_derived({**DEFAULTS, "method": "easier"})
    assert easier["epochs"] < cfg["epochs"] and easier["rounds"] >= 17 and easier["max_drop"] == 0.01
    vit = _resolve_derived({**DEFAULTS, "model": "digits_vit"})
    assert (vit["optimizer"], vit["width"]) == ("adamw", 64)
    hard = _resolve_derived({**DEFAULTS, "data": "digits-hard"})
    assert (hard["width"], hard["image_size"]) == (16, 32)  # the small digits network, on its 32x32 canvas


def _imported_modules(path) -> set[str]:
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_the_run_never_imports_the_option_parser():
    """commands.py parses options and starts a Run; the run's modules share only defaults.py with it."""
    import pathlib

    import egp_fast.cli
    import egp_fast.cli.commands
    import egp_fast.cli.defaults

    cli = pathlib.Path(egp_fast.cli.__file__).parent
    offenders = [p.name for p in sorted(cli.glob("*.py")) if p.name not in ("__init__.py", "__main__.py", "commands.py")
                 and "egp_fast.cli.commands" in _imported_modules(p)]
    assert not offenders, f"these modules import the option parser: {offenders}"
    assert egp_fast.cli.commands.PROG == egp_fast.cli.defaults.PROG


def test_defaults_stay_inside_the_cli():
    """egp_fast/cli/defaults.py is the command's own: no other part of the package (nor the
    benchmarks) imports it."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2]
    files = [p for p in [*(root / "egp_fast").rglob("*.py"), *(root / "benchmarks").rglob("*.py")]
             if (root / "egp_fast" / "cli") not in p.parents]
    users = [str(p.relative_to(root)) for p in files
             if any(m == "egp_fast.cli.defaults" or m.startswith("egp_fast.cli.defaults.") for m in _imported_modules(p))]
    assert not users, f"egp_fast.cli.defaults imported outside the CLI: {users}"


@pytest.mark.parametrize("argv", [[], ["prune", "--bogus"], ["prune", "--rounds", "x"], ["frobnicate"],
                                  ["prune", "--method", "random"], ["report"],
                                  ["prune", "--linearization", "zero"], ["prune", "--measure", "some"]])
def test_usage_errors_are_one_line_exit_2(argv, capsys):
    assert main(argv) == 2
    _one_line_error(capsys)


@pytest.mark.parametrize("opts, words", [
    (["--model", "resnet_nope"], "unknown model"),
    (["--step", "1.0"], "--step"),
    (["--step", "1.5"], "--step"),
    (["--step", "0"], "--step"),
    (["--rounds", "-1"], "--rounds"),
    (["--data", "mnist"], "unknown data kind"),
    (["--name", "../x"], "--name"),
    (["--name", "a/b"], "--name"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "-0.1"], "--lr"),
    (["--weights", "/nonexistent/w.pt"], "--weights"),
    (["--val-fraction", "1.0"], "--val-fraction"),
    (["--method", "easier", "--val-fraction", "0"], "validation split"),
    (["--max-drop", "-0.1"], "--max-drop"),
    (["--max-flip", "0"], "--max-flip"),
    (["--confidence", "1.0"], "--confidence"),
    (["--fold-epochs", "-1"], "--fold-epochs"),
    (["--model", "digits_vit", "--width", "30"], "heads"),
])
def test_bad_options_one_line_nothing_written(opts, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["prune", *QUICK, "--runs-root", str(tmp_path / "runs"), *opts]) == 2
    assert words in _one_line_error(capsys)
    assert os.listdir(tmp_path) == []


def test_missing_data_path_fails_fast_with_layout(tmp_path, capsys):
    rc = main(["prune", *QUICK, "--data", f"cifar10:{tmp_path / 'none'}", "--out", str(tmp_path / "r")])
    assert rc == 1
    assert "cifar-10-batches-py" in _one_line_error(capsys)


def test_unwritable_run_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["prune", *QUICK, "--out", str(blocker / "run")]) == 2
    assert "cannot write run directory" in _one_line_error(capsys)
    assert blocker.read_text() == "x"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_parent(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["prune", *QUICK, "--out", str(ro / "run")]) == 2
        assert "cannot write" in _one_line_error(capsys)
    finally:
        ro.chmod(0o700)


def test_refuses_existing_nonempty_run_dir(tiny_run, capsys):
    before = _snapshot(tiny_run)
    assert main(["prune", *TINY, "--out", str(tiny_run)]) == 2
    assert "--resume" in _one_line_error(capsys)
    assert _snapshot(tiny_run) == before


def test_resume_with_another_config_refused(tiny_run, capsys):
    before = _snapshot(tiny_run)
    assert main(["prune", "--resume", str(tiny_run), "--step", "0.25"]) == 2
    line = _one_line_error(capsys)
    assert "--step 0.25 differs" in line
    assert main(["prune", "--resume", str(tiny_run), "--method", "imp"]) == 2
    _one_line_error(capsys)
    assert _snapshot(tiny_run) == before


def test_resume_of_non_run_dir(tmp_path, capsys):
    assert main(["prune", "--resume", str(tmp_path)]) == 2
    assert "not an egp-fast run directory" in _one_line_error(capsys)


def test_resume_of_edited_config_refused(tiny_run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["options"]["seed"] = 1234
    (copy / "config.json").write_text(json.dumps(cfg))
    before = _snapshot(copy)
    assert main(["prune", "--resume", str(copy)]) == 2
    assert "edited" in _one_line_error(capsys)
    assert _snapshot(copy) == before


def test_truncated_checkpoint_on_resume(tiny_run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    data = (copy / "checkpoint.pt").read_bytes()
    (copy / "checkpoint.pt").write_bytes(data[: len(data) // 3])
    assert main(["prune", "--resume", str(copy)]) == 1
    assert "truncated or corrupt" in _one_line_error(capsys)


# ------------------------------------------------------------------ a run's outputs
def test_run_outputs(tiny_run, capsys):
    cfg = json.loads((tiny_run / "config.json").read_text())
    opts = cfg["options"]
    assert opts["step"] == 0.5 and opts["method"] == "egp" and opts["width"] == 8 and opts["rounds"] == 2
    assert cfg["versions"]["torch"] == torch.__version__ and cfg["versions"]["device"] == "cpu"
    assert "egp_fast" in cfg["versions"]

    with open(tiny_run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["phase"], r["round"], r["epoch"]) for r in rows] == [
        ("dense", "0", "1"), ("dense", "0", "2"), ("dense", "0", "3"), ("dense", "0", "4"),
        ("finetune", "1", "1"), ("finetune", "1", "2"), ("finetune", "2", "1"), ("finetune", "2", "2")]
    assert float(rows[-1]["sparsity"]) == pytest.approx(0.75, abs=1e-3)

    rep = json.loads((tiny_run / "report.json").read_text())
    assert rep["complete"] is True and [r["round"] for r in rep["rounds"]] == [0, 1, 2]
    # 10% of the 500 training samples held out, stratified: the test split is untouched
    assert (rep["data"]["train_size"], rep["data"]["val_size"], rep["data"]["test_size"]) == (450, 50, 360)
    assert all(0 < r["val_accuracy"] <= 1 and r["measure_batches"] >= 1 for r in rep["rounds"])
    r1 = rep["rounds"][1]
    assert r1["sparsity"] == pytest.approx(0.5, abs=1e-3) and r1["n_sites"] == 17
    assert set(r1["entropy"]) == set(rep["model"]["sites"]) and len(r1["layers"]) == len(rep["model"]["prunable"])
    assert sum(r1["allocation"].values()) == r1["pruned"] > 0
    assert all(r1["entropy"][s] == 0 for s in r1["zero_entropy_sites"])
    assert len(r1["stats"]["sites"][0]["p_on"]) == r1["stats"]["sites"][0]["channels"]
    summ = rep["summary"]
    assert summ["acc_dense"] == rep["rounds"][0]["accuracy"] and summ["acc_pruned"] == rep["rounds"][-1]["accuracy"]
    assert "acc_collapsed" in summ and summ["sites_after"] <= summ["sites_before"]
    assert summ["sites_after"] == summ["sites_before"] - len(summ["removed_sites"])
    # Every zero-entropy site is either collapsed (with its evidence) or left with the reason.
    weak = {w["site"] for w in summ["left_weak"]}
    assert set(rep["rounds"][-1]["zero_entropy_sites"]) <= set(summ["removed_sites"]) | weak
    for row in summ["evidence"]:
        assert row["flip_bound"] <= summ["max_flip"] and row["samples"] >= 298
        assert row["held_out_samples"] == 50 and 0 <= row["held_out_flip_rate"] <= 1
    assert summ["acc_collapsed"] == pytest.approx(summ["acc_pruned"])
    for png in ("entropy_heatmap.png", "sparsity_curves.png"):
        assert (tiny_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [n for n in os.listdir(tiny_run) if ".tmp-" in n]


def test_pruned_model_reloads(tiny_run):
    rep = json.loads((tiny_run / "report.json").read_text())
    sd = torch.load(tiny_run / "model.pt", weights_only=True)
    assert any(k.endswith(".weight_mask") for k in sd)
    model = build_model("cifar_resnet18", 10, in_channels=1, width=8)
    load_pruned_state_dict(model, sd)
    src = load_data("digits", image_size=8, limit=500)
    acc = evaluate(model, make_loader(src.test, 64), device=torch.device("cpu"))["acc"]
    assert acc == pytest.approx(rep["summary"]["acc_pruned"])


def test_collapsed_model_reloads_and_runs_at_any_batch(tiny_run):
    rep = json.loads((tiny_run / "report.json").read_text())
    saved = rep["collapse"]["saved"]
    assert saved["format"] == "torch.export" and "batch" in saved["dynamic"]
    assert saved["checked_batches"] == [1, 7, 64]
    model = torch.export.load(str(tiny_run / saved["file"])).module()
    src = load_data("digits", image_size=8, limit=500)
    x, y = src.test.x, src.test.y
    with torch.no_grad():
        full = model(x[:64])  # the example was batch 2: batch 64, 7 and 1 must run too
        assert torch.allclose(model(x[:7]), full[:7], atol=1e-5) and torch.allclose(model(x[:1]), full[:1], atol=1e-5)
        pred = torch.cat([model(x[i:i + 64]).argmax(1) for i in range(0, len(y), 64)])
    assert float((pred == y).float().mean()) == pytest.approx(rep["summary"]["acc_collapsed"])


def test_resume_of_a_finished_run_reproduces_report(tiny_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    assert main(["prune", "--resume", str(copy), "--no-progress", "--no-latency"]) == 0
    a = json.loads((tiny_run / "report.json").read_text())
    b = json.loads((copy / "report.json").read_text())
    assert [r["accuracy"] for r in a["rounds"]] == [r["accuracy"] for r in b["rounds"]]
    assert a["summary"]["acc_collapsed"] == b["summary"]["acc_collapsed"]


def test_imp_prunes_every_weight_layer(tmp_path):
    out = tmp_path / "imp"
    assert main(["prune", *QUICK, "--method", "imp", "--rounds", "1", "--no-collapse", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    prunable = rep["model"]["prunable"]
    assert "fc" in prunable and "layer2.0.downsample.0" in prunable and len(prunable) == 21
    assert rep["rounds"][1]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert "collapse" not in rep and "acc_collapsed" not in rep["summary"]


def test_default_run_dir_under_runs_root(tmp_path):
    root = tmp_path / "runs"
    argv = ["prune", *QUICK, "--rounds", "0", "--no-collapse", "--runs-root", str(root)]
    assert main(argv) == 0 and main(argv) == 0  # same second: the second run gets its own directory
    names = sorted(os.listdir(root))
    assert len(names) == 2 and all(n.startswith("egp-digits-") for n in names)
    assert main(["prune", *QUICK, "--rounds", "0", "--no-collapse", "--runs-root", str(root), "--name", "mine"]) == 0
    assert (root / "mine" / "report.json").is_file()


def test_amp_and_channels_last_on_cpu(tmp_path):
    out = tmp_path / "amp"
    assert main(["prune", *QUICK, "--amp", "--channels-last", "--rounds", "1", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["complete"] and rep["config"]["amp"] and rep["config"]["channels_last"]
    assert 0 <= rep["summary"]["acc_pruned"] <= 1


@pytest.mark.requires_cuda
def test_cuda_run_with_amp(tmp_path):
    """GPU path: fp16 autocast + GradScaler, pinned memory, channels-last, collapse on the device."""
    out = tmp_path / "cuda"
    assert main(["prune", *QUICK, "--device", "cuda", "--amp", "--channels-last", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["versions"]["device"].startswith("cuda") and "gpu" in cfg["versions"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["complete"] and rep["summary"]["device"].startswith("cuda")
    resumed = tmp_path / "copy"
    import shutil

    shutil.copytree(out, resumed)
    assert main(["prune", "--resume", str(resumed), "--no-progress"]) == 0


# ------------------------------------------------------------------ EASIER, fold-finetune, --measure auto
EASIER = ["--method", "easier", *TINY[:TINY.index("--epochs")], "--epochs", "1", "--lr", "0.03",
          "--batch-size", "32", "--eval-batch-size", "128", "--no-progress", "--no-latency"]


def _affine_sites(state_dict) -> set[str]:
    return {k[: -len(".scale")] for k in state_dict if k.endswith(".scale")}


def test_easier_removes_lowest_entropy_site_and_rolls_back_past_the_tolerance(tmp_path, monkeypatch, capsys):
    """Round 2's validation accuracy is forced below the tolerance: the run stops there and keeps
    round 1's model (one site removed), which is what gets saved, collapsed and fold-finetuned."""
    import egp_fast.cli.train as train_module

    real = train_module.evaluate
    calls = {"val": 0}

    def evaluate(model, loader, **kw):
        out = real(model, loader, **kw)
        if kw.get("desc") == "eval val":
            calls["val"] += 1
            if calls["val"] == 3:  # dense, round 1, round 2: round 2 falls outside the tolerance
                out = {**out, "acc": 0.0}
        return out

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    out = tmp_path / "easier"
    assert main(["prune", *EASIER, "--rounds", "3", "--max-drop", "0.05", "--fold-epochs", "1",
                 "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    rounds = rep["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and rounds[2]["val_accuracy"] == 0.0
    assert rep["easier"]["best_round"] == 1 and "below the dense" in rep["easier"]["stopped"]
    # each step removed the live site of lowest entropy measured after the previous step
    for prev, cur in zip(rounds, rounds[1:]):
        assert cur["removed_sites"] == [min(prev["entropy"], key=prev["entropy"].get)]
    assert [len(s) for s in rep["easier"]["removed"]] == [1, 1]
    summ = rep["summary"]
    assert summ["acc_pruned"] == rounds[1]["accuracy"] and summ["easier_removed"] == rounds[1]["removed_sites"]
    # the kept model is round 1's: one linearised site in model.pt, and its collapse is exact
    assert _affine_sites(torch.load(out / "model.pt", weights_only=True)) == set(rounds[1]["removed_sites"])
    assert summ["acc_collapsed"] == pytest.approx(summ["acc_pruned"]) and summ["sites_after"] == 16
    # fold-finetune: accuracy before and after, and the saved collapsed model is the fine-tuned one
    fold = rep["fold_finetune"]
    assert fold["acc_before"] == pytest.approx(summ["acc_collapsed"]) and fold["epochs"] == 1
    printed = capsys.readouterr().out
    assert summ["acc_fold_after"] == fold["acc_after"] and "fold-finetune (1 epochs on the collapsed model)" in printed
    assert "kept step 1 with 1 sites removed" in printed
    model = torch.export.load(str(out / "collapsed.pt2")).module()
    src = load_data("digits", image_size=8, limit=500)
    with torch.no_grad():
        pred = model(src.test.x).argmax(1)
    assert float((pred == src.test.y).float().mean()) == pytest.approx(fold["acc_after"])


def test_easier_latency_objective_records_groups_and_speedups(tmp_path, capsys):
    out = tmp_path / "easier_latency"
    assert main(["prune", *EASIER, "--rounds", "2", "--max-drop", "0.5", "--objective", "latency",
                 "--approx-collapse", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    ez = rep["easier"]
    assert ez["objective"] == "latency"
    steps = ez["speedups"]
    # one entry per applied step, naming the sites it removed (the group) and both speed-ups
    assert [e["round"] for e in steps] == [r["round"] for r in rep["rounds"][1:]]
    for e, r in zip(steps, rep["rounds"][1:]):
        assert sorted(e["group"]) == sorted(r["removed_sites"])
        assert e["predicted"] >= 1.0 and (e["measured"] is None or e["measured"] > 0)
    kept = [e for e in steps if e["round"] <= ez["best_round"]]
    assert kept  # --max-drop 0.5 keeps the steps
    assert rep["summary"]["easier_predicted_speedup"] == kept[-1]["predicted"]
    assert f"speed-up predicted {kept[-1]['predicted']:.2f}x" in capsys.readouterr().out


def test_measure_auto_stops_early_and_reports_batches(tmp_path):
    out = tmp_path / "auto"
    argv = ["prune", "--width", "8", "--image-size", "8", "--dense-epochs", "2", "--epochs", "1", "--rounds", "1",
            "--batch-size", "64", "--eval-batch-size", "16", "--measure", "auto", "--no-progress", "--no-latency",
            "--no-collapse", "--out", str(out)]
    assert main(argv) == 0
    rep = json.loads((out / "report.json").read_text())
    full = -(-rep["data"]["train_size"] // 16)
    batches = [r["measure_batches"] for r in rep["rounds"]]
    assert all(1 <= b <= full for b in batches) and any(r["measure_stopped_early"] for r in rep["rounds"]), batches


def test_worker_default_follows_available_cores(monkeypatch):
    from egp_fast.cli import defaults

    monkeypatch.setattr(defaults.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert defaults.available_cores() == 2
    assert defaults.default_workers() == 2 and defaults.default_workers(world_size=2) == 1
    monkeypatch.setattr(defaults.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert defaults.default_workers() == 4


def test_compile_on_one_cpu_thread_is_refused(tmp_path, capsys):
    assert main(["prune", *QUICK, "--compile", "--threads", "1", "--device", "cpu", "--out", str(tmp_path / "c")]) == 2
    assert "--threads 2" in _one_line_error(capsys)


@pytest.mark.slow
def test_compile_option_trains_with_masks_held(tmp_path):
    """--compile: torch.compile wraps the training model; pruned weights stay exactly zero."""
    out = tmp_path / "compiled"
    assert main(["prune", *QUICK, "--rounds", "1", "--compile", "--threads", "2", "--no-collapse", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["complete"] and rep["config"]["compile"] is True
    sd = torch.load(out / "model.pt", weights_only=True)
    masks = {k[: -len("_mask")]: v for k, v in sd.items() if k.endswith("weight_mask")}
    assert masks and all(float(sd[k][~m.bool()].abs().sum()) == 0.0 for k, m in masks.items())
    assert rep["rounds"][1]["sparsity"] == pytest.approx(0.5, abs=1e-3)


# ------------------------------------------------------------------ --max-flip / --confidence
@pytest.fixture(scope="module")
def always_on_weights(tmp_path_factory):
    """cifar_resnet18 weights whose stem ReLU ("relu") is always ON: a zero-entropy site."""
    model = build_model("cifar_resnet18", 10, in_channels=1, width=4, image_size=8)
    with torch.no_grad():
        model.bn1.bias.fill_(100.0)
    path = tmp_path_factory.mktemp("weights") / "always_on.pt"
    torch.save(model.state_dict(), path)
    return path


def _evidence_run(out, weights, *opts):
    # No training (the site stays always ON), one measurement batch of 16 samples: the flip
    # bound is 17.1% at 95% confidence, 4.2% at 50%. ~1.5 s per run.
    argv = ["prune", "--width", "4", "--image-size", "8", "--limit", "120", "--dense-epochs", "0", "--rounds", "0",
            "--batch-size", "16", "--eval-batch-size", "16", "--measure-batches", "1", "--no-progress",
            "--no-latency", "--weights", str(weights), "--out", str(out), *opts]
    assert main(argv) == 0
    return json.loads((out / "report.json").read_text())["summary"]


@pytest.mark.parametrize("strict, lenient", [
    ([], ["--max-flip", "0.5"]),  # the default 0.01 against a lenient bound
    (["--max-flip", "0.1"], ["--max-flip", "0.1", "--confidence", "0.5"]),  # 17.1% > 10% >= 4.2%
], ids=["max-flip", "confidence"])
def test_max_flip_and_confidence_decide_what_collapses(strict, lenient, always_on_weights, tmp_path):
    kept = _evidence_run(tmp_path / "strict", always_on_weights, *strict)
    gone = _evidence_run(tmp_path / "lenient", always_on_weights, *lenient)
    assert kept["zero_sites"] == gone["zero_sites"] >= 1
    weak = {e["site"]: e["reason"] for e in kept["left_weak"]}
    assert "relu" in weak and "seen on 16 samples" in weak["relu"] and "at 95% confidence" in weak["relu"]
    assert "relu" not in kept["removed_sites"]
    assert "relu" in gone["removed_sites"] and not gone["left_weak"]
    assert sorted(gone["removed_sites"]) == sorted(weak)  # the same sites, collapsed or left
    bound = {e["site"]: e["flip_bound"] for e in gone["evidence"]}
    confidence = 0.5 if "--confidence" in lenient else 0.95
    assert bound["relu"] == pytest.approx(1 - (1 - confidence) ** (1 / 16))
    assert (gone["max_flip"], gone["confidence"]) == (float(lenient[1]), confidence)
