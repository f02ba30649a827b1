"""Argument and result checks of the pruning loop, and the accuracy tolerance it stops on.

:class:`egp_fast.Pruner` and :func:`egp_fast.prune` validate their arguments here (each error
names the argument and what it should be); :func:`within_tolerance` is the rule that ends a
run with an accuracy tolerance (EASIER's, or ``max_drop=`` with any method), also used by the
``egp-fast`` command.
"""

from __future__ import annotations

import math
from typing import Any

from egp_fast.errors import ConfigError, NumericsError

__all__ = [
    "LINEARIZATIONS",
    "check_accuracy",
    "check_entropy_mode",
    "check_linearization",
    "check_max_drop",
    "check_step",
    "within_tolerance",
]

#: How EASIER replaces a chosen site that still changes state: ``"identity"`` (``y = z``, the
#: paper's choice) or ``"majority"`` (per channel: identity where ``p_on >= 0.5``, zero otherwise).
LINEARIZATIONS = ("identity", "majority")


def within_tolerance(accuracy: float, dense_accuracy: float, max_drop: float) -> bool:
    """True when ``accuracy`` is at most ``max_drop`` below ``dense_accuracy``.

    A tiny slack (1e-12) absorbs float rounding, so a drop of exactly ``max_drop`` is kept.
    :func:`egp_fast.prune` and the ``egp-fast`` command decide EASIER's stop with it.

    Args:
        accuracy: validation accuracy after an iteration, in [0, 1].
        dense_accuracy: validation accuracy of the dense model, in [0, 1].
        max_drop: accepted drop, as a fraction (0.01 = one point).

    Returns:
        Whether the iteration is within the tolerance.

    Example:
        >>> within_tolerance(0.95, 0.96, 0.01), within_tolerance(0.94, 0.96, 0.01)
        (True, False)
    """
    return accuracy >= dense_accuracy - max_drop - 1e-12


def check_step(step: Any) -> float:
    """Validate ``step``, the fraction of the remaining weights pruned per round.

    Returns:
        ``float(step)``.

    Raises:
        ConfigError: not a number strictly between 0 and 1.

    Example:
        >>> check_step(0.5)
        0.5
    """
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step < 1:
        raise ConfigError(
            f"step={step!r} must be a number strictly between 0 and 1 (the fraction of the "
            "remaining weights pruned per round; the paper uses 0.5)"
        )
    return float(step)


def check_entropy_mode(entropy_mode: Any) -> str:
    """Validate ``entropy_mode`` (``"exact"`` or ``"paper"``, see :func:`egp_fast.measure_entropy`).

    Raises:
        ConfigError: another value.

    Example:
        >>> check_entropy_mode("paper")
        'paper'
    """
    if entropy_mode not in ("exact", "paper"):
        raise ConfigError(f"entropy_mode={entropy_mode!r}; use 'exact' or 'paper'")
    return entropy_mode


def check_accuracy(value: Any, when: str) -> float:
    """Validate what ``evaluate(model)`` returned: a finite number in [0, 1].

    Args:
        value: the return value of the user's ``evaluate``.
        when: words for the error message (``"before the first iteration"``).

    Returns:
        ``float(value)``.

    Raises:
        ConfigError: not a number, or outside [0, 1].
        NumericsError: NaN or infinite.

    Example:
        >>> check_accuracy(0.5, "after iteration 0")
        0.5
    """
    try:
        if isinstance(value, bool):
            raise TypeError
        acc = float(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"evaluate(model) returned {value!r} {when}; it must return the accuracy as a float "
            "in [0, 1] (on a validation split)"
        ) from None
    if not math.isfinite(acc):
        raise NumericsError(f"evaluate(model) returned {acc} {when}; the model's outputs may have diverged")
    if not 0.0 <= acc <= 1.0:
        raise ConfigError(
            f"evaluate(model) returned {acc} {when}; return a fraction in [0, 1] (e.g. 0.93, not 93)"
        )
    return acc


def check_max_drop(max_drop: Any) -> float:
    """Validate ``max_drop`` (accuracy points as a fraction: 0.01 = one point).

    Args:
        max_drop: the value given by the user.

    Returns:
        ``float(max_drop)``.

    Raises:
        ConfigError: not a finite number >= 0.

    Example:
        >>> check_max_drop(0.01)
        0.01
    """
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not max_drop >= 0:
        raise ConfigError(
            f"max_drop={max_drop!r} must be a number >= 0: the largest accuracy drop below the "
            "dense model's that is still accepted, as a fraction (0.01 = one point)"
        )
    if not math.isfinite(max_drop):
        raise ConfigError(f"max_drop={max_drop!r} must be finite (use 1.0 to accept any drop)")
    return float(max_drop)


def check_linearization(linearization: Any) -> str:
    """Validate ``linearization`` (``"identity"`` or ``"majority"``).

    Args:
        linearization: the value given by the user.

    Returns:
        The same string.

    Raises:
        ConfigError: not one of :data:`LINEARIZATIONS`.

    Example:
        >>> check_linearization("majority")
        'majority'
    """
    if linearization not in LINEARIZATIONS:
        raise ConfigError(
            f"linearization={linearization!r}; use 'identity' (EASIER: the activation becomes "
            "y = z) or 'majority' (per channel: identity if mostly ON, zero if mostly OFF)"
        )
    return linearization
