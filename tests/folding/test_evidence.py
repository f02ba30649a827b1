"""Collapse and the evidence behind it: flip bounds, weak sites left in place, held-out checks.

The interleaved latency comparison is tested in test_latency.py."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from _collapse_helpers import Branchy
from torch import nn

import egp_fast
from egp_fast.folding import collapse
from egp_fast.folding.evidence import evidence
from egp_fast.errors import ConfigError
from egp_fast.measurement import flip_bound, measure_entropy, samples_needed


def _measure(model, batches):
    stats = measure_entropy(model, batches, progress=False)
    n = sum((b if isinstance(b, torch.Tensor) else next(iter(b.values()))).shape[0] for b in batches)
    assert stats.samples == n and all(s.samples == n for s in stats.sites.values())
    return stats


def _always_on_net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        net[0].bias += 100.0
    return net


class _NoEvidence:
    """Site statistics that do not say how many samples they saw (older or hand-made stats)."""

    def __init__(self, st):
        self._st = st

    def __getattr__(self, name):
        if name in ("samples", "flip_bound"):
            raise AttributeError(name)
        return getattr(self._st, name)


# ---------------------------------------------------------------------------- the bound


def test_flip_bound_matches_binomial_and_is_never_zero():
    for n in (1, 8, 30, 299, 1437, 10**6, 10**12):
        q = flip_bound(n, 0.95)
        assert 0.0 < q <= 1.0
        # Exact: P(no flip in n samples | q) == 1 - confidence.
        assert math.exp(n * math.log1p(-q)) == pytest.approx(0.05, rel=1e-9)
    assert flip_bound(8) == pytest.approx(0.3123, abs=1e-4)
    assert flip_bound(1437) == pytest.approx(0.00208, abs=1e-5)
    assert flip_bound(0) == 1.0
    assert flip_bound(100, 0.99) > flip_bound(100, 0.95)
    assert samples_needed(0.01) == 299 and flip_bound(299) <= 0.01 < flip_bound(298)
    with pytest.raises(ConfigError, match="confidence"):
        flip_bound(10, 1.0)


def test_evidence_prefers_stats_bound_and_reads_samples():
    class WithBound:
        samples = 50

        def flip_bound(self, confidence):
            return 0.123

    assert evidence(WithBound()) == (50, 0.123)
    n, b = evidence(type("S", (), {"samples": 8})())
    assert n == 8 and b == pytest.approx(flip_bound(8))
    assert evidence(object()) == (None, None)


# ---------------------------------------------------------------------------- collapse decisions


def test_weak_site_left_with_numbers_strong_site_collapsed():
    net = _always_on_net()
    x = torch.randn(2, 4)
    few = _measure(net, [torch.randn(8, 4)])
    weak = collapse(net, few, x, measure_latency=False)
    assert weak.removed_sites == [] and weak.weak_sites == ["1"]
    entry = weak.left[0]
    assert entry["samples"] == 8 and entry["flip_bound"] == pytest.approx(0.3123, abs=1e-4)
    assert entry["reason"].startswith("seen on 8 samples: flip bound 31.2% > 1%")
    assert "max_flip=1.0" in entry["reason"]
    assert weak.after["sites"] == 1
    forced = collapse(net, few, x, measure_latency=False, max_flip=1.0)
    assert forced.removed_sites == ["1"] and forced.after["sites"] == 0
    lin = [e for e in forced.removed if e["kind"] == "linearize"][0]
    assert lin["samples"] == 8 and lin["flip_bound"] == pytest.approx(0.3123, abs=1e-4)
    # A looser max_flip accepts the same evidence; 512 samples pass the default 1%.
    assert collapse(net, few, x, measure_latency=False, max_flip=0.35).removed_sites == ["1"]
    many = _measure(net, [torch.randn(256, 4), torch.randn(256, 4)])
    out = collapse(net, many, x, measure_latency=False)
    assert out.removed_sites == ["1"] and not out.weak_sites
    assert out.settings["max_flip"] == 0.01 and out.settings["confidence"] == 0.95
    # Higher confidence asks for more samples: 512 samples give 0.9% at 99%, not enough for 0.5%.
    assert collapse(net, many, x, measure_latency=False, max_flip=0.005, confidence=0.99).weak_sites == ["1"]


def test_unknown_evidence_left_unless_max_flip_one():
    net = _always_on_net()
    x = torch.randn(2, 4)
    st = _measure(net, [torch.randn(512, 4)])
    st.sites = {k: _NoEvidence(v) for k, v in st.sites.items()}
    out = collapse(net, st, x, measure_latency=False)
    assert out.weak_sites == ["1"] and "unknown" in out.left[0]["reason"]
    assert out.left[0]["samples"] is None and out.left[0]["flip_bound"] is None
    assert collapse(net, st, x, measure_latency=False, max_flip=1.0).removed_sites == ["1"]


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, "0.01", True, None])
def test_bad_max_flip_rejected(bad):
    net = _always_on_net()
    st = _measure(net, [torch.randn(8, 4)])
    with pytest.raises(ConfigError, match="max_flip"):
        collapse(net, st, torch.randn(2, 4), measure_latency=False, max_flip=bad)


@pytest.mark.parametrize("bad", [0.0, 1.0, 95, -1])
def test_bad_confidence_rejected(bad):
    net = _always_on_net()
    st = _measure(net, [torch.randn(8, 4)])
    with pytest.raises(ConfigError, match="confidence"):
        collapse(net, st, torch.randn(2, 4), measure_latency=False, confidence=bad)


def test_mobilenet_v2_one_round_on_eight_random_images():
    # Issue 13: one prune round on 2 batches of 4 random images leaves most sites at "zero
    # entropy" seen on 8 samples. Defaults must keep them all (with the reason); max_flip=1.0
    # removes them.
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    data = [torch.randn(4, 3, 64, 64) for _ in range(2)]
    pruner = egp_fast.Pruner(model, data[0])
    pruner.apply(pruner.plan(pruner.measure(data)))
    stats = _measure(model, data)
    zero = stats.zero_entropy_sites()
    assert len(zero) >= len(stats.sites) // 2  # the issue saw 29 of 35
    out = collapse(model, stats, data[0], measure_latency=False)
    assert out.removed_sites == [] and sorted(out.weak_sites) == sorted(zero)
    for e in out.left:
        if e.get("kind") == "evidence":
            assert e["samples"] == 8 and e["reason"].startswith("seen on 8 samples: flip bound 31.2% > 1%")
    assert out.after["sites"] == len(stats.sites)
    forced = collapse(model, stats, data[0], measure_latency=False, max_flip=1.0)
    assert sorted(forced.removed_sites) == sorted(zero) and not forced.weak_sites
    assert forced.after["sites"] <= len(stats.sites) - len(zero)
    assert forced.relative_deviation <= 1e-4


# ---------------------------------------------------------------------------- held-out check


def _flip_net():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].bias.copy_(torch.tensor([3.0, -3.0, 3.0, -3.0, 3.0, 3.0]))  # |w x| < 3 on small x
        net[2].bias += 50.0
    return net


def test_check_reports_observed_per_sample_flip_rate():
    net = _flip_net()
    small = [torch.rand(256, 4) * 0.1, torch.rand(256, 4) * 0.1]
    st = _measure(net, small)
    assert st.zero_entropy_sites() == ["1", "3"]
    held = [torch.randn(50, 4) * 8, (torch.randn(30, 4) * 8, torch.zeros(30))]
    out = collapse(net, st, small[0][:2], measure_latency=False, check=held)
    assert out.removed_sites == ["1", "3"]
    # Ground truth, sample by sample, on the original model.
    xs = torch.cat([held[0], held[1][0]])
    with torch.no_grad():
        z = net[0](xs)
    piece = st.sites["1"].piece
    moved = (z > 0).long() != piece
    expect = int(moved.any(dim=1).sum())
    got = out.check["1"]
    assert got["samples"] == 80 and got["flipped_samples"] == expect > 0
    assert got["flip_rate"] == pytest.approx(expect / 80)
    assert got["channels_changed"] == int(moved.any(dim=0).sum()) and got["channels"] == 6
    assert got["per"] == "sample"
    lin = {e["site"]: e for e in out.removed if e["kind"] == "linearize"}
    assert lin["1"]["held_out"] == got
    d = out.to_dict()
    json.dumps(d)
    assert d["check"]["1"]["flipped_samples"] == expect and d["settings"]["check"] is True


def test_check_on_data_like_the_measurement_sees_no_flip_and_dict_batches():
    net = _always_on_net()
    st = _measure(net, [torch.randn(512, 4)])
    out = collapse(net, st, torch.randn(2, 4), measure_latency=False, check=torch.randn(40, 4))
    assert out.check["1"]["samples"] == 40 and out.check["1"]["flipped_samples"] == 0
    assert out.check["1"]["flip_rate"] == 0.0

    class KwNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)

        def forward(self, inp):
            return self.fc2(self.act(self.fc1(inp)))

    kw = KwNet()
    with torch.no_grad():
        kw.fc1.bias += 100.0
    st = _measure(kw, [{"inp": torch.randn(512, 4)}])
    out = collapse(kw, st, {"inp": torch.randn(2, 4)}, measure_latency=False,
                   check=[{"inp": torch.randn(16, 4), "labels": torch.zeros(16)}])
    assert out.removed_sites == ["act"] and out.check["act"]["samples"] == 16


def test_check_on_untraceable_model_uses_hooks():
    net = Branchy()
    with torch.no_grad():
        net.fc1.bias.fill_(3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st = _measure(net, [torch.rand(512, 4) * 0.01])
        held = torch.randn(64, 4) * 10
        out = collapse(net, st, torch.randn(2, 4), measure_latency=False, check=[held])
    assert out.removed_sites == ["act"]
    with torch.no_grad():
        expect = int(((net.fc1(held) > 0).long() != st.sites["act"].piece).any(dim=1).sum())
    assert out.check["act"]["flipped_samples"] == expect > 0


def test_check_rejects_empty_and_non_iterable():
    net = _always_on_net()
    st = _measure(net, [torch.randn(512, 4)])
    with pytest.raises(egp_fast.DataError, match="no batches"):
        collapse(net, st, torch.randn(2, 4), measure_latency=False, check=[])
    with pytest.raises(ConfigError, match="check"):
        collapse(net, st, torch.randn(2, 4), measure_latency=False, check=3)
