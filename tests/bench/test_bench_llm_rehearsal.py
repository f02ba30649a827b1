"""The code paths of benchmarks/bench_llm.py (one EGP round on a LLaMA-style model) and
benchmarks/bench_rehearsal.py (the ImageNet-layout folder and the analysis of a run's report),
on tiny sizes. The full benchmarks are run by hand; their results are in benchmarks/results/."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TINY = ["--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "96",
        "--vocab", "128", "--batches", "3", "--batch", "2", "--seq", "16", "--threads", "1", "--forwards", "1"]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_llm_round_on_a_tiny_llama(dtype):
    pytest.importorskip("transformers")
    bench = _load("bench_llm")
    args = bench.parse_args([*TINY, "--dtype", dtype])
    model = bench.build_model(args)
    assert str(next(model.parameters()).dtype) == {"bf16": "torch.bfloat16", "fp32": "torch.float32"}[dtype]
    res = bench.run_round(args, model=model)
    # the sites are the SiLU of each gated MLP; the producer EGP prunes is gate_proj
    assert res["sites"] == 2 and res["site_example"] == "model.layers.0.mlp.act_fn"
    assert res["prunable_layers"] == 2 and res["prunable_weights"] == 2 * 64 * 96
    assert res["pruned"] == pytest.approx(res["prunable_weights"] / 2, abs=2)
    assert res["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert 1 <= res["measure_batches"] <= 3 and res["tokens_per_batch"] == 32
    assert set(res["phases"]) == {"forward0", "trace", "measure", "select", "masks"}
    assert all(p["seconds"] >= 0 and p["peak_extra_bytes"] >= 0 for p in res["phases"].values())
    assert res["round_seconds"] == pytest.approx(sum(res["phases"][p]["seconds"]
                                                     for p in ("measure", "select", "masks")))
    assert res["measure_vs_forwards"] > 0
    text = bench.markdown({"command": "x", "date": "d", "machine": "m", "torch": "t", "transformers": "t",
                           "load_before": [0.0], "load_after": [0.0],
                           "args": {k: v for k, v in vars(args).items() if k != "child"}, "result": res})
    assert "| **round (measure + plan + apply)** |" in text and "`gate_proj` weights pruned in 2 layers" in text


def test_llm_child_command_round_trips_the_options():
    bench = _load("bench_llm")
    args = bench.parse_args([*TINY, "--measure", "full", "--out", "/tmp/x"])
    argv = bench._child_argv(args)
    assert "--child" in argv and "--out" not in argv
    back = bench.parse_args(argv[2:])
    assert {k: v for k, v in vars(back).items() if k not in ("child", "out")} == \
        {k: v for k, v in vars(args).items() if k not in ("child", "out")}


def test_rehearsal_folder_is_what_imagenet_data_reads(tmp_path):
    pytest.importorskip("torchvision")
    from egp_fast.cli.data import load_data

    bench = _load("bench_rehearsal")
    args = bench.parse_args(["--root", str(tmp_path), "--classes", "3", "--train-per-class", "4",
                             "--val-per-class", "2", "--size", "32"])
    info = bench.make_folder(args)
    assert not info["reused"] and info["train_images"] == 12 and info["val_images"] == 6
    assert bench.make_folder(args)["reused"]  # same settings: kept
    src = load_data(f"imagenet:{info['path']}", image_size=32)
    assert src.num_classes == 3 and len(src.train) == 12 and len(src.test) == 6
    x, y = src.test[0]
    assert tuple(x.shape) == (3, 32, 32)
    # images are deterministic and differ between classes
    a, b = bench._image(0, 0, 3, 32, 0), bench._image(0, 0, 3, 32, 0)
    assert (a == b).all() and not (a == bench._image(1, 0, 3, 32, 0)).all()
    cmd = bench.prune_command(args, info["path"], str(tmp_path / "run"))
    assert cmd[cmd.index("--data") + 1] == f"imagenet:{info['path']}" and cmd[cmd.index("--measure") + 1] == "auto"


@pytest.mark.parametrize("stopped", [True, False])
def test_rehearsal_analysis_of_a_report(stopped):
    bench = _load("bench_rehearsal")
    args = bench.parse_args([])
    zero = dict.fromkeys(bench.PHASE_ORDER, 0.0)
    # batches and samples of a measurement are summed over the ranks
    rounds = [{"round": 0, "seconds": 50.0, "measure_batches": 8, "measure_stopped_early": stopped,
               "time": {**zero, "setup": 20.0, "eval": 20.0, "measure": 10.0}},
              {"round": 1, "seconds": 230.0, "measure_batches": 8, "measure_stopped_early": stopped,
               "stats": {"samples": 128},
               "time": {**zero, "train": 200.0, "eval": 20.0, "measure": 9.0, "select": 0.5, "masks": 0.5}}]
    report = {"config": {"epochs": 1, "eval_batch_size": 16, "batch_size": 8},
              "data": {"train_size": 1800, "val_size": 200, "test_size": 200},
              "model": {"params": 25_557_032}, "rounds": rounds,
              "summary": {"world_size": 2, "time_final": {**zero, "collapse": 5.0}, "time": zero,
                          "wall_seconds": 285.0}}
    an = bench.analyse(report, args)
    assert an["egp_seconds"] == 10.0 and an["finetune_epoch_seconds"] == 200.0
    assert an["egp_share_of_epoch"] == pytest.approx(0.05)
    assert an["measure_samples"] == 128 and an["train_batches_per_epoch"] == 225
    ex = an["extrapolation"]
    # forward cost per image vs training: (9 s * 2 ranks / 128) / (200 s * 2 ranks / 1800)
    ratio = (9 * 2 / 128) / (200 * 2 / 1800)
    assert ex["forward_vs_train_per_image"] == pytest.approx(ratio)
    assert ex["epoch_seconds"] == pytest.approx(1_281_167 / (8 * 1200))
    assert 0 < ex["egp_share_of_epoch"] < an["egp_share_of_epoch"] and ex["is_lower_bound"] is not stopped
    assert ex["full_pass_share_of_epoch"] == pytest.approx(ratio + 1.0 / ex["epoch_seconds"])
    # the samples that keep the share at 5%: 5% of the epoch, less selection and masks, at the forward rate
    assert ex["samples_for_5pct"] == pytest.approx((0.05 * ex["epoch_seconds"] - 1.0) * 8 * 1200 / ratio)
    text = bench.markdown({"command": "c", "date": "d", "machine": "m", "torch": "t", "load_before": [1.0],
                           "load_after": [1.0], "args": vars(args), "folder": {"seconds": 1.0},
                           "prune_command": ["python", "-m", "x"], "run_seconds": 290.0, "analysis": an})
    assert "5.0% of one fine-tune epoch" in text and "ImageNet-1k extrapolation" in text
    assert ("did not stop before the end" in text) is not stopped
    json.dumps(an)  # JSON-safe
