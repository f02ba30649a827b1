import math

import pytest

import egp_fast
from egp_fast.errors import ConfigError, NumericsError


def _softmax_shares(s):
    total = sum(s.values())
    irr = {k: total / v for k, v in s.items()}
    top = max(irr.values())
    e = {k: math.exp(v - top) for k, v in irr.items()}
    z = sum(e.values())
    return {k: v / z for k, v in e.items()}


def test_hand_worked_uncapped():
    # s = {a: 0.2, b: 0.9}; I = {a: 5.5, b: 1.2222}; r_a = 1 / (1 + e^(1.2222 - 5.5)) = 0.98632...
    out = egp_fast.allocate({"a": 0.2, "b": 0.9}, {"a": 1.0, "b": 1.0}, {"a": 100, "b": 100}, 100)
    assert out == {"a": 98, "b": 1}


def test_capping_water_fills_the_rest():
    out = egp_fast.allocate({"a": 0.2, "b": 0.9}, {"a": 1.0, "b": 1.0}, {"a": 30, "b": 100}, 100)
    assert out == {"a": 30, "b": 70}


def test_one_hot_softmax_sends_budget_to_lowest_entropy():
    ent = {"a": 0.01, "b": 0.9, "c": 0.95}
    out = egp_fast.allocate(ent, {k: 1.0 for k in ent}, {k: 10_000 for k in ent}, 5000)
    assert out == {"a": 5000, "b": 0, "c": 0}


def test_equal_entropies_split_evenly():
    ent = {k: 0.5 for k in "abc"}
    out = egp_fast.allocate(ent, {k: 1.0 for k in ent}, {k: 100 for k in ent}, 150)
    assert out == {"a": 50, "b": 50, "c": 50}


def test_magnitude_matters():
    # same entropy, smaller weights => larger irrelevance => more pruning
    out = egp_fast.allocate({"a": 0.5, "b": 0.5}, {"a": 0.1, "b": 0.2}, {"a": 100, "b": 100}, 20)
    s = _softmax_shares({"a": 0.05, "b": 0.1})
    assert out == {"a": math.floor(20 * s["a"]), "b": math.floor(20 * s["b"])}
    assert out["a"] > out["b"]


def test_zero_entropy_and_empty_layers_get_nothing():
    out = egp_fast.allocate({"a": 0.0, "b": 0.5, "c": 0.5}, {"a": 1.0, "b": 1.0, "c": 1.0},
                            {"a": 100, "b": 100, "c": 0}, 50)
    assert out == {"a": 0, "b": 50, "c": 0}


def test_budget_larger_than_everything_takes_everything():
    out = egp_fast.allocate({"a": 0.3, "b": 0.6}, {"a": 1.0, "b": 2.0}, {"a": 7, "b": 9}, 1000)
    assert out == {"a": 7, "b": 9}


def test_order_invariance_and_bounds():
    ent = {f"l{i}": 0.1 + 0.07 * i for i in range(9)}
    mag = {k: 0.5 + 0.01 * i for i, k in enumerate(ent)}
    rem = {k: 1000 + 37 * i for i, k in enumerate(ent)}
    a = egp_fast.allocate(ent, mag, rem, 4321)
    rev = {k: ent[k] for k in reversed(list(ent))}
    b = egp_fast.allocate(rev, mag, rem, 4321)
    assert a == b
    assert all(0 <= a[k] <= rem[k] for k in a)
    assert 4321 - len(a) <= sum(a.values()) <= 4321


def test_bad_inputs():
    with pytest.raises(NumericsError, match="entropy"):
        egp_fast.allocate({"a": float("nan")}, {"a": 1.0}, {"a": 1}, 1)
    with pytest.raises(ConfigError, match="budget"):
        egp_fast.allocate({"a": 0.5}, {"a": 1.0}, {"a": 1}, -1)
    with pytest.raises(ConfigError, match="same keys"):
        egp_fast.allocate({"a": 0.5}, {}, {"a": 1}, 1)
