"""Property-based tests of the budget allocation (water-filling over softmax relevance)."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egp_fast import allocate
from egp_fast.errors import ConfigError, NumericsError

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

# Entropies are in [0, 1] bits (more for multi-piece sites); magnitudes from dead-small to huge.
entropies = st.one_of(st.just(0.0), st.floats(0.0, 2.0), st.sampled_from([1e-300, 5e-324, 1e-12, 1.0]))
magnitudes = st.one_of(st.just(0.0), st.floats(0.0, 1e6), st.sampled_from([1e-300, 5e-324, 1e-30, 1e300]))
remainings = st.one_of(st.just(0), st.integers(0, 10), st.integers(0, 10**9))


@st.composite
def problems(draw, max_layers: int = 8):
    names = draw(st.lists(st.text("abcxyz._0123", min_size=1, max_size=6), min_size=0,
                          max_size=max_layers, unique=True))
    entropy = {n: draw(entropies) for n in names}
    magnitude = {n: draw(magnitudes) for n in names}
    remaining = {n: draw(remainings) for n in names}
    total = sum(remaining.values())
    budget = draw(st.one_of(st.floats(0, max(total, 1) * 1.5), st.just(float(total)), st.just(0.0),
                            st.floats(0, 1e12)))
    return entropy, magnitude, remaining, budget


def _eligible(entropy, magnitude, remaining):
    return [k for k in entropy if entropy[k] > 0 and remaining[k] > 0 and magnitude[k] > 0]


@settings(max_examples=150, **SETTINGS)
@given(problems())
def test_allocation_bounds_and_total(problem):
    entropy, magnitude, remaining, budget = problem
    out = allocate(entropy, magnitude, remaining, budget)
    assert set(out) == set(entropy)
    for k, n in out.items():
        assert isinstance(n, int)
        assert 0 <= n <= remaining[k], (k, n, remaining[k])
    pool = _eligible(entropy, magnitude, remaining)
    for k in set(entropy) - set(pool):
        assert out[k] == 0, f"{k} is not eligible (zero entropy, weight or magnitude) but got {out[k]}"
    target = min(budget, sum(remaining[k] for k in pool))
    total = sum(out.values())
    # Never more than asked (a float budget may exceed the int total by < 1); at most one
    # weight per layer lost to rounding down.
    assert total <= math.floor(target) + 0
    assert total >= math.floor(target) - len(pool), (total, target, len(pool))


@settings(max_examples=80, **SETTINGS)
@given(problems(), st.randoms(use_true_random=False))
def test_allocation_is_invariant_to_layer_order(problem, rnd):
    entropy, magnitude, remaining, budget = problem
    keys = list(entropy)
    rnd.shuffle(keys)
    out = allocate(entropy, magnitude, remaining, budget)
    shuffled = allocate({k: entropy[k] for k in keys}, {k: magnitude[k] for k in reversed(keys)},
                        {k: remaining[k] for k in keys}, budget)
    assert out == shuffled


@settings(max_examples=150, **SETTINGS)
@given(st.lists(st.floats(1e-3, 1.0), min_size=2, max_size=6), st.integers(1, 10**6),
       st.floats(0.01, 1.0))
def test_lower_entropy_gets_at_least_as_much(hs, size, frac):
    # Equal sizes and magnitudes: relevance orders layers by entropy, so does the allocation
    # (up to the one weight each layer may lose to rounding).
    names = [f"l{i}" for i in range(len(hs))]
    entropy = dict(zip(names, hs))
    out = allocate(entropy, dict.fromkeys(names, 1.0), dict.fromkeys(names, size), frac * size * len(hs))
    for a in names:
        for b in names:
            if entropy[a] < entropy[b]:
                assert out[a] >= out[b] - 1, (entropy[a], out[a], entropy[b], out[b])


def test_allocation_matches_the_worked_example():
    out = allocate({"a": 0.2, "b": 0.9}, {"a": 1.0, "b": 1.0}, {"a": 100, "b": 100}, 100)
    # s = (0.2, 0.9), I = (5.5, 1.2222), softmax ~ (0.9863, 0.0137) -> floor(98.63), floor(1.37)
    assert out == {"a": 98, "b": 1}


def test_water_filling_passes_the_excess_on():
    # "a" is asked for far more than its 10 weights: it gets all 10 and "b" the rest.
    out = allocate({"a": 0.01, "b": 0.9}, {"a": 1.0, "b": 1.0}, {"a": 10, "b": 1000}, 500)
    assert out == {"a": 10, "b": 490}


@pytest.mark.parametrize(
    "args, error",
    [
        (({"a": math.nan}, {"a": 1.0}, {"a": 1}, 1), NumericsError),
        (({"a": -0.1}, {"a": 1.0}, {"a": 1}, 1), NumericsError),
        (({"a": 0.5}, {"a": math.inf}, {"a": 1}, 1), NumericsError),
        (({"a": 0.5}, {"a": 1.0}, {"a": -1}, 1), ConfigError),
        (({"a": 0.5}, {"a": 1.0}, {"a": 1.5}, 1), ConfigError),
        (({"a": 0.5}, {"a": 1.0}, {"a": 1}, -1), ConfigError),
        (({"a": 0.5}, {"a": 1.0}, {"a": 1}, math.nan), ConfigError),
        (({"a": 0.5}, {}, {"a": 1}, 1), ConfigError),
        (([0.5], {"a": 1.0}, {"a": 1}, 1), ConfigError),
    ],
)
def test_allocate_rejects_bad_input(args, error):
    with pytest.raises(error):
        allocate(*args)


def test_tiny_entropy_times_tiny_weights_does_not_divide_by_zero():
    # s = H * |w| underflows to 0.0 here; it used to raise ZeroDivisionError.
    out = allocate({"a": 1e-200, "b": 0.5}, {"a": 1e-200, "b": 1.0}, {"a": 10, "b": 10}, 10)
    assert out == {"a": 10, "b": 0}


def test_huge_irrelevance_is_one_hot_not_nan():
    # I_a ~ 1e250 and I_b ~ 1: inf - inf would make every softmax weight NaN.
    out = allocate({"a": 1e-150, "b": 1.0}, {"a": 1e-100, "b": 1e100}, {"a": 50, "b": 50}, 40)
    assert out == {"a": 40, "b": 0}
    # two layers with the same tiny s share the budget
    out = allocate({"a": 1e-300, "b": 1e-300, "c": 1.0}, {"a": 1e-10, "b": 1e-10, "c": 1.0},
                   {"a": 50, "b": 50, "c": 50}, 40)
    assert out == {"a": 20, "b": 20, "c": 0}
