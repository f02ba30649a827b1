"""The argument checks of Pruner and prune(), and the accuracy tolerance the loop stops on."""

import math

import pytest

from egp_fast.errors import ConfigError, NumericsError
from egp_fast.pruning.checks import (
    check_accuracy,
    check_entropy_mode,
    check_linearization,
    check_max_drop,
    check_step,
    within_tolerance,
)


def test_within_tolerance_edges():
    assert within_tolerance(0.89, 0.90, 0.01)
    assert not within_tolerance(0.8899, 0.90, 0.01)
    assert within_tolerance(0.95, 0.90, 0.0)


@pytest.mark.parametrize("step", [0, 1, 1.5, -0.1, True, "0.5", None, math.nan])
def test_check_step_refuses(step):
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        check_step(step)


def test_check_step_accepts_and_returns_a_float():
    assert check_step(0.25) == 0.25 and isinstance(check_step(0.25), float)


def test_check_entropy_mode():
    assert check_entropy_mode("exact") == "exact"
    with pytest.raises(ConfigError, match="entropy_mode='fast'"):
        check_entropy_mode("fast")


@pytest.mark.parametrize(
    "value,err,match",
    [
        ("good", ConfigError, "float"),
        (True, ConfigError, "float"),
        (93.0, ConfigError, r"\[0, 1\]"),
        (-0.1, ConfigError, r"\[0, 1\]"),
        (math.nan, NumericsError, "nan"),
        (math.inf, NumericsError, "inf"),
    ],
)
def test_check_accuracy_refuses(value, err, match):
    with pytest.raises(err, match=match):
        check_accuracy(value, "after round 0")


def test_check_accuracy_accepts_the_ends():
    assert check_accuracy(0, "x") == 0.0 and check_accuracy(1, "x") == 1.0


@pytest.mark.parametrize("value,match", [(-0.1, "max_drop=-0.1"), (True, "max_drop=True"), ("1", "max_drop='1'"),
                                         (math.inf, "finite")])
def test_check_max_drop_refuses(value, match):
    with pytest.raises(ConfigError, match=match):
        check_max_drop(value)


def test_check_linearization():
    assert check_linearization("identity") == "identity"
    with pytest.raises(ConfigError, match="linearization='zero'"):
        check_linearization("zero")
