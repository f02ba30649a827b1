"""compare_latency: the two models timed interleaved, judged from the paired ratios (on a fake
clock with planted timings), and the latency fields collapse reports."""

from __future__ import annotations

import json

import pytest
import torch
from _clock import UNIT, Costly, FakeClock
from torch import nn

from egp_fast.errors import ConfigError
from egp_fast.folding import collapse, compare_latency
from egp_fast.measurement import measure_entropy


def _always_on_net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        net[0].bias += 100.0
    return net


def _fake_clock(monkeypatch):
    from egp_fast.folding import latency as collapse_latency
    return FakeClock().install(monkeypatch, collapse_latency)


def test_compare_latency_interleaved_and_judged(monkeypatch):
    # Planted timings on a fake clock: `big` costs 4 units per sample, `small` 1 unit.
    clock = _fake_clock(monkeypatch)
    big = Costly(clock, lambda bs, i: 4 * UNIT * bs)
    small = Costly(clock, lambda bs, i: UNIT * bs)
    x = torch.randn(2, 64)
    r = compare_latency(big, small, x, batch_sizes=(1, 8), budget_s=0.1, min_rounds=4, max_rounds=10,
                        min_run_s=4 * UNIT)
    assert set(r["batches"]) == {1, 8} and r["threads"] == torch.get_num_threads()
    one, eight = r["batches"][1], r["batches"][8]
    # a run repeats the forward until the faster model's run lasts min_run_s: 4 forwards at
    # batch 1 (1 unit each), 1 at batch 8 (8 units)
    assert one["forwards_per_run"] == 4 and eight["forwards_per_run"] == 1
    # rounds go on until the budget is spent: 20 units a round at batch 1 (over 0.1 s after 6
    # rounds); at batch 8 three rounds spend it, but min_rounds=4 are always done
    assert one["rounds"] == 6 and eight["rounds"] == 4
    for bs, row in ((1, one), (8, eight)):
        assert row["a_ms"] == pytest.approx(1e3 * 4 * UNIT * bs) and row["b_ms"] == pytest.approx(1e3 * UNIT * bs)
        assert row["a_iqr_ms"] == [pytest.approx(row["a_ms"])] * 2
        assert row["speedup"] == 4.0 and row["speedup_iqr"] == [4.0, 4.0] and row["ratio_of_medians"] == 4.0
        assert not row["inside_noise"] and row["verdict"].startswith(f"b is 4.00x faster at batch {bs}")
    same = compare_latency(small, small, x, batch_sizes=(4,), budget_s=0.2, min_rounds=8, max_rounds=8)
    assert same["batches"][4]["speedup"] == 1.0 and same["batches"][4]["inside_noise"]
    assert same["batches"][4]["verdict"].startswith("no measurable difference at batch 4")
    back = compare_latency(small, big, x, batch_sizes=(8,), budget_s=0.2, min_rounds=4, max_rounds=4)
    assert back["batches"][8]["speedup"] == 0.25 and "b is 4.00x slower" in back["batches"][8]["verdict"]
    with pytest.raises(ConfigError, match="batch_sizes"):
        compare_latency(small, small, x, batch_sizes=())
    with pytest.raises(ConfigError, match="rounds"):
        compare_latency(small, small, x, min_rounds=5, max_rounds=2)


def _planted(clock, per_round):
    """A model whose round ``r`` costs ``per_round[r]`` units (after its warm-up and calibration)."""
    return Costly(clock, lambda bs, i: UNIT * (1.0 if i < 2 else per_round[i - 2]))


def test_compare_latency_judges_noise_from_the_paired_ratios(monkeypatch):
    clock = _fake_clock(monkeypatch)
    x = torch.randn(1, 4)

    def judge(ta, tb):
        a, b = _planted(clock, ta), _planted(clock, tb)
        n = len(ta)
        return compare_latency(a, b, x, batch_sizes=(1,), budget_s=1e-9, min_rounds=n, max_rounds=n,
                               min_run_s=0.0)["batches"][1]

    # paired ratios 2, 0.5, 2, 0.5: their interquartile range contains 1
    row = judge([2, 2, 2, 2], [1, 4, 1, 4])
    assert row["speedup_iqr"] == [0.5, 2.0] and row["speedup"] == 1.25
    assert row["inside_noise"] and row["verdict"].startswith("no measurable difference at batch 1 (1.25x")
    # paired ratios all above 1 but for one: the paired estimate says b is faster (1.11x), the
    # ratio of the medians (1 / 9) says it is slower; estimators that disagree are noise too
    row = judge([10, 10, 1, 1, 1], [9, 9, 0.5, 0.5, 20])
    assert row["speedup"] == pytest.approx(10 / 9) and row["speedup_iqr"] == [pytest.approx(10 / 9), 2.0]
    assert row["ratio_of_medians"] == pytest.approx(1 / 9)
    assert row["inside_noise"] and row["verdict"].startswith("no measurable difference")
    # the same ratios without the outlier pair: b is measurably faster
    row = judge([10, 10, 1, 1], [9, 9, 0.5, 0.5])
    assert row["speedup"] == pytest.approx((10 / 9 + 2) / 2)
    assert not row["inside_noise"] and row["verdict"].startswith("b is 1.56x faster at batch 1")
    # load that changes from round to round hits both models of a round: the paired ratio stays 3
    load = [1, 8, 2, 16, 4, 1]
    row = judge([3 * v for v in load], load)
    assert row["speedup"] == 3.0 and row["speedup_iqr"] == [3.0, 3.0]


def test_collapse_latency_fields_and_table():
    net = _always_on_net()
    st = measure_entropy(net, [torch.randn(512, 4)], progress=False)
    out = collapse(net, st, torch.randn(2, 4), measure_latency=True)
    assert set(out.latency["batches"]) == {1, 64}
    assert out.before["latency_ms_b1"] == out.latency["batches"][1]["a_ms"]
    assert out.after["latency_ms_b64"] == out.latency["batches"][64]["b_ms"]
    assert "speed-up" in out.table() and "IQR" in out.table()
    d = out.to_dict()
    assert set(d["latency"]["batches"]) == {"1", "64"}
    json.dumps(d)


def test_compare_latency_alternates_the_two_models():
    calls = []

    class Tag(nn.Module):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            calls.append(self.tag)
            return self.lin(x)

    a, b = Tag("a"), Tag("b")
    r = compare_latency(a, b, torch.randn(1, 2), batch_sizes=(1,), budget_s=1e-6, min_rounds=4,
                        max_rounds=4, min_run_s=0.0)
    assert r["batches"][1]["rounds"] == 4 and r["batches"][1]["forwards_per_run"] == 1
    timed = calls[-8:]  # after warm-up and calibration
    assert timed == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert a.training and b.training  # flags restored
