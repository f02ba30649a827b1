"""A run's artefacts: versions, evidence and latency fields, and the saved collapsed model
running at any batch size."""

from __future__ import annotations

import pytest
import torch

import egp_fast
from egp_fast.cli.artifacts import evidence_rows, latency_summary, save_collapsed, versions
from egp_fast.cli.models import build_model, digits_vit


def test_versions_name_the_software_and_device():
    v = versions(torch.device("cpu"))
    assert v["torch"] == torch.__version__ and v["egp_fast"] == egp_fast.__version__ and v["device"] == "cpu"
    assert "gpu" not in v


def test_latency_summary_fields_by_batch():
    lat = {"threads": 2, "batches": {"64": {"a_ms": 4.0, "b_ms": 2.0, "speedup": 2.0, "rounds": 9},
                                     "1": {"a_ms": 1.0, "b_ms": 0.8, "speedup": 1.25, "inside_noise": True}}}
    out = latency_summary(lat)
    assert (out["latency_pruned_ms"], out["latency_collapsed_ms"], out["latency_speedup"]) == (4.0, 2.0, 2.0)
    assert out["latency_b1_collapsed_ms"] == 0.8 and out["latency_b1_inside_noise"] is True
    assert out["latency_batch"] == 64 and out["latency_threads"] == 2
    assert latency_summary({}) == {}


def test_evidence_rows_only_linearised_sites():
    class Res:
        removed = [{"kind": "linearize", "site": "relu", "samples": 300, "flip_bound": 0.01,
                    "held_out": {"samples": 50, "flipped_samples": 0, "flip_rate": 0.0}},
                   {"kind": "compose_linear", "layers": ["a", "b"]}]

    assert evidence_rows(Res()) == [{"site": "relu", "samples": 300, "flip_bound": 0.01, "held_out_samples": 50,
                                     "held_out_flipped": 0, "held_out_flip_rate": 0.0}]


def _collapsed_resnet():
    net = build_model("cifar_resnet18", 10, in_channels=1, width=4).eval()
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        net.layer3[0].bn1.bias.fill_(5.0)  # relu1 of that block always ON: a zero-entropy site
    stats = egp_fast.measure_entropy(net, [x], progress=False)
    out = egp_fast.collapse(net, stats, x[:2], measure_latency=False, max_flip=1.0)
    assert out.removed_sites
    return out.model, x


def _collapsed_vit():
    net = digits_vit(10, dim=16, depth=2, heads=4, mlp=32).eval()
    x = torch.randn(16, 1, 16, 16)
    stats = egp_fast.measure_entropy(net, [x], progress=False)
    egp_fast.linearize(net, stats, sites=list(stats.sites), how="identity")
    return egp_fast.collapse(net, stats, x[:2], measure_latency=False).model, x


@pytest.mark.parametrize("build", [_collapsed_resnet, _collapsed_vit], ids=["resnet", "vit"])
def test_saved_collapsed_model_runs_at_batch_1_7_64(build, tmp_path):
    """collapsed.pt2 was exported at batch 2 with a dynamic batch: load the file and compare it
    with the in-memory collapsed model at batch 1, 7 and 64."""
    model, x = build()
    saved = save_collapsed(model, x[:2], str(tmp_path))
    assert saved["format"] == "torch.export" and "batch" in saved["dynamic"]
    loaded = torch.export.load(str(tmp_path / "collapsed.pt2")).module()
    for b in (1, 7, 64):
        xb = torch.randn(b, *x.shape[1:])
        with torch.no_grad():
            want, got = model(xb), loaded(xb)
        assert got.shape == (b, 10) and torch.allclose(got, want, atol=1e-5, rtol=1e-4), b
    sd = torch.load(tmp_path / "collapsed_state_dict.pt", weights_only=True)
    assert set(sd) == set(model.state_dict())
