"""EASIER: remove activation sites one at a time, guided by their entropy.

EASIER (Quétu, Liao, Tartaglione; ECML-PKDD 2024), the EGP authors' follow-up, does not wait for
pruning to make a layer affine: each iteration it measures the entropy of every activation
site, replaces the live site with the lowest entropy (and every site already at zero entropy)
by a linear map, fine-tunes, and evaluates; it keeps the last model whose validation accuracy is
within a tolerance of the dense one. The replaced sites leave affine layers behind that
:func:`egp_fast.collapse` folds.

This module is the *method* (what an iteration measures, chooses and changes). The loop around
it (measure, choose, apply, fine-tune, evaluate, record, roll back) is the one in
:mod:`egp_fast.prune`, shared with EGP and IMP: ``egp_fast.prune(model, data, method="easier",
evaluate=fn)`` runs it, ``egp_fast.Pruner(model, x, method="easier")`` steps through it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

from egp_fast.folding.affine import linearize_sites, unremovable_sites
from egp_fast.errors import ConfigError, NumericsError

__all__ = [
    "LINEARIZATIONS",
    "EasierMethod",
    "check_accuracy",
    "check_linearization",
    "check_max_drop",
    "choose_sites",
    "within_tolerance",
]

#: How EASIER replaces a chosen site that still changes state: ``"identity"`` (``y = z``, the
#: paper's choice) or ``"majority"`` (per channel: identity where ``p_on >= 0.5``, zero otherwise).
LINEARIZATIONS = ("identity", "majority")


def choose_sites(stats: Any, exclude: Iterable[str] = ()) -> list[str]:
    """The sites one EASIER iteration removes, in execution order.

    Every site already at zero entropy (all channels constant on the data), plus the live site
    with the lowest layer entropy among the others (ties: the first in execution order).

    Args:
        stats: :class:`egp_fast.EntropyStats` of the current model (its sites are the live ones).
        exclude: sites not to choose (e.g. those that cannot be replaced in place).

    Returns:
        Site names; empty when ``stats`` has no site.

    Raises:
        ConfigError: ``stats`` is not an :class:`~egp_fast.EntropyStats`.

    Example:
        >>> import torch, egp_fast
        >>> from egp_fast.pruning.easier import choose_sites
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8),
        ...                           torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> net[0].bias.data += 100.0  # site "1" is always ON: zero entropy
        >>> stats = egp_fast.measure_entropy(net, [torch.randn(64, 4)], progress=False)
        >>> choose_sites(stats)
        ['1', '3']
    """
    sites = getattr(stats, "sites", None)
    if not isinstance(sites, dict):
        raise ConfigError(f"stats must be the EntropyStats of measure(), got {type(stats).__name__}")
    skip = set(exclude)
    zero = [n for n, s in sites.items() if s.collapsible and n not in skip]
    live = [s for s in sites.values() if not s.collapsible and s.name not in skip]
    chosen = set(zero)
    if live:
        # min() keeps the first of equal keys: ties go to the earlier site in execution order.
        chosen.add(min(live, key=lambda s: s.entropy).name)
    return [n for n in sites if n in chosen]


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


class EasierMethod:
    """The EASIER method as a :class:`~egp_fast.Pruner` strategy: a round removes sites.

    ``plan(stats)`` returns ``{site: 1}`` for the sites :func:`choose_sites` picks; ``apply``
    replaces them in place: sites at zero entropy by their exact map on the data
    (``how="data"``), the others by ``linearization``. No weight is pruned.

    A site that cannot be replaced in place (a functional activation in the root module's own
    ``forward``, unless the model is an ``fx.GraphModule``: pass ``egp_fast.trace(model)``) is
    never chosen; a warning names it once, with the reason, and :attr:`skipped` lists it.

    Args:
        linearization: ``"identity"`` or ``"majority"``.

    Raises:
        ConfigError: unknown ``linearization``.

    Example:
        >>> EasierMethod("majority").linearization
        'majority'
    """

    name = "easier"
    prunes_weights = False

    def __init__(self, linearization: str = "identity") -> None:
        self.linearization = check_linearization(linearization)
        self.skipped: dict[str, str] = {}

    def layers(self, pruner: Any) -> list[str]:
        """EASIER prunes no weight layer: no masks are attached."""
        return []

    def plan(self, pruner: Any, stats: Any, remaining: dict[str, int]) -> dict[str, int]:
        blocked = unremovable_sites(pruner.model, list(stats.sites))
        for name, why in blocked.items():
            if name not in self.skipped:
                warnings.warn(f"method='easier' skips site {name}: {why}", stacklevel=3)
            self.skipped[name] = why
        return {n: 1 for n in choose_sites(stats, exclude=blocked)}

    def apply(self, pruner: Any, plan: dict[str, int], stats: Any) -> list[str]:
        """Linearise the planned sites; returns their names in execution order."""
        if stats is None:
            raise ConfigError(
                "method='easier': apply(plan) needs the EntropyStats the plan came from; call "
                "plan(stats) first or pass apply(plan, stats=stats)"
            )
        known = stats.sites
        unknown = [n for n in plan if n not in known]
        if unknown:
            raise ConfigError(
                f"plan names sites the model does not have (live sites: {', '.join(known) or 'none'}): "
                f"{unknown[:5]}; method='easier' plans are {{site_name: 1}}"
            )
        bad = {n: v for n, v in plan.items() if isinstance(v, bool) or v not in (0, 1)}
        if bad:
            raise ConfigError(f"method='easier' plan values must be 1 (remove) or 0 (keep), got {bad}")
        names = [n for n in known if plan.get(n, 0)]
        if not names:
            return []
        how = {n: "data" if known[n].collapsible else self.linearization for n in names}
        done, refused = linearize_sites(pruner.model, stats, names, how)
        if refused:
            reasons = "; ".join(f"{n}: {why}" for n, why in refused)
            raise ConfigError(f"method='easier' could not remove site(s) {reasons}")
        return done

    def progressed(self, record: Any) -> bool:
        """A round made progress when it removed a site."""
        return bool(record.removed_sites)
