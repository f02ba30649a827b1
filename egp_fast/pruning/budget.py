"""How a round's pruning budget is shared between layers (docs/algorithm.md, "One pruning round", steps 4-6).

* irrelevance ``s_l = H_l * mean|w_l|`` (over the nonzero weights), ``I_l = sum_k s_k / s_l``
* relevance share ``r = softmax(I)``
* allocation ``n_l = B * r_l``; a layer asked for more than it has left gets all of it and
  leaves the pool, and the rest is shared again (water-filling) until nothing is capped
* each ``n_l`` rounded down.

Sums use ``math.fsum`` (correctly rounded, so independent of the order of the layers) and
layers are processed in sorted-name order: the result never depends on dict order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from egp_fast.errors import ConfigError, NumericsError


def _check(entropy, magnitude, remaining, budget) -> None:
    for name, d in (("entropy", entropy), ("magnitude", magnitude), ("remaining", remaining)):
        if not isinstance(d, Mapping):
            raise ConfigError(f"allocate: {name} must be a dict keyed by layer name")
    missing = (set(entropy) - set(magnitude)) | (set(entropy) - set(remaining))
    if missing:
        raise ConfigError(
            f"allocate: layers {sorted(missing)} have an entropy but no magnitude/remaining; "
            "give all three dicts the same keys"
        )
    for k in entropy:
        h, m, r = entropy[k], magnitude[k], remaining[k]
        if not math.isfinite(h) or h < 0:
            raise NumericsError(f"allocate: entropy[{k!r}]={h} must be finite and >= 0")
        if not math.isfinite(m) or m < 0:
            raise NumericsError(f"allocate: magnitude[{k!r}]={m} must be finite and >= 0")
        if int(r) != r or r < 0:
            raise ConfigError(f"allocate: remaining[{k!r}]={r} must be a non-negative integer")
    if not math.isfinite(budget) or budget < 0:
        raise ConfigError(f"allocate: budget={budget} must be finite and >= 0")


def _softmax_weights(
    entropy: Mapping[str, float], magnitude: Mapping[str, float], pool: list[str], s_pool: list[float],
    positive: bool = False,
) -> list[float]:
    """``exp(I_k - max I)`` for the layers in ``pool`` (in its order), ``I_k = sum_j s_j / s_k``,
    ``s_pool[k] = H_k * mean|w_k|``; ``positive`` says every ``s`` is known to be > 0.

    On lists: the plan rule runs the allocation ~20 times per check, and water-filling repeats
    this once per capped layer. ``exp(d)`` for ``d < -746`` is exactly 0.0, so it is skipped.
    """
    total = math.fsum(s_pool)
    if (positive or all(v > 0 for v in s_pool)) and math.isfinite(total):
        irr = [total / v for v in s_pool]
        top = max(irr)
        if math.isfinite(top):
            return [math.exp(i - top) if i - top > -746.0 else 0.0 for i in irr]
    # A product s underflowed to 0 (tiny entropy times tiny weights), the sum overflowed, or
    # some I_k overflowed: the plain formula would divide by zero or give inf - inf = NaN.
    # Work with log s instead (H and |w| are > 0 and finite here).
    logs = [math.log(entropy[k]) + math.log(magnitude[k]) for k in pool]
    big = max(logs)
    log_total = big + math.log(math.fsum(math.exp(v - big) for v in logs))
    log_irr = [log_total - v for v in logs]
    top = max(log_irr)
    if top < 700.0:  # every I_k fits a float: the ordinary softmax
        irr = [math.exp(v) for v in log_irr]
        peak = max(irr)
        return [math.exp(i - peak) for i in irr]
    # max I > 1e304: a layer whose log I differs from the top by even one ulp lies more than
    # 1e290 below it, so its softmax weight is exactly 0; ties with the top share equally.
    return [1.0 if v == top else 0.0 for v in log_irr]


def allocate(
    entropy: Mapping[str, float],
    magnitude: Mapping[str, float],
    remaining: Mapping[str, int],
    budget: float,
) -> dict[str, int]:
    """Split ``budget`` weights to prune between layers, favouring low-entropy, small-weight ones.

    Args:
        entropy: layer -> entropy ``H_l`` of the site it feeds. Layers with ``H_l = 0`` are
            already collapsible and get nothing; so do layers with no weight left.
        magnitude: layer -> mean ``|w|`` over its nonzero weights.
        remaining: layer -> number of nonzero (unpruned) weights.
        budget: total number of weights to prune this round, ``B = step * sum(remaining)`` of
            the eligible layers in EGP.

    Returns:
        layer -> integer count, ``0 <= n_l <= remaining[l]``, summing to ``budget`` up to
        rounding (at most one weight per layer short), for every layer in ``entropy``.

    Example:
        >>> import egp_fast
        >>> egp_fast.allocate({"a": 0.2, "b": 0.9}, {"a": 1.0, "b": 1.0}, {"a": 100, "b": 100}, 100)
        {'a': 98, 'b': 1}
    """
    shares = allocation_shares(entropy, magnitude, remaining, budget)
    return {k: min(int(math.floor(v)), int(remaining[k])) for k, v in shares.items()}


def allocation_shares(
    entropy: Mapping[str, float],
    magnitude: Mapping[str, float],
    remaining: Mapping[str, int],
    budget: float,
) -> dict[str, float]:
    """:func:`allocate` before rounding down: layer -> share of ``budget`` (a float).

    A capped layer's share is its ``remaining`` count exactly. The early-stopping plan rule
    (``Pruner.measure(stop="decided")``) judges these shares: rounding down is not smooth in
    the entropies, so the jackknife would read its jumps as noise.

    Example:
        >>> from egp_fast.pruning.budget import allocation_shares
        >>> shares = allocation_shares({"a": 0.2, "b": 0.9}, {"a": 1.0, "b": 1.0}, {"a": 100, "b": 100}, 100)
        >>> round(shares["a"], 3), round(shares["b"], 3)
        (98.632, 1.368)
    """
    _check(entropy, magnitude, remaining, budget)
    shares = {k: 0.0 for k in entropy}
    pool = sorted(
        k for k in entropy if entropy[k] > 0 and remaining[k] > 0 and magnitude[k] > 0
    )
    left = float(min(budget, math.fsum(remaining[k] for k in pool)))
    s_of = {k: entropy[k] * magnitude[k] for k in pool}  # s does not change between passes
    positive = all(v > 0 for v in s_of.values())  # then every sub-pool is positive too
    while pool and left > 0:
        e = _softmax_weights(entropy, magnitude, pool, [s_of[k] for k in pool], positive)
        z = math.fsum(e)
        capped = [i for i, ek in enumerate(e) if ek and left * ek / z >= remaining[pool[i]]]
        if not capped:
            for k, ek in zip(pool, e):
                shares[k] = left * ek / z
            break
        for i in capped:
            shares[pool[i]] = float(remaining[pool[i]])
            left -= remaining[pool[i]]
        gone = set(capped)
        pool = [k for i, k in enumerate(pool) if i not in gone]
    return shares


def round_shares(
    entropy: Mapping[str, float],
    magnitude: Mapping[str, float],
    remaining: Mapping[str, int],
    step: float,
) -> dict[str, float]:
    """One EGP round's shares before rounding: the budget is ``step`` times the nonzero weights
    of the eligible layers (entropy > 0, weights left), shared by :func:`allocation_shares`.

    ``allocate`` with that budget is what ``Pruner.plan`` returns for ``method="egp"``; rounded
    down, these shares are the same numbers.
    """
    return allocation_shares(entropy, magnitude, remaining, round_budget(entropy, remaining, step))


def round_budget(entropy: Mapping[str, float], remaining: Mapping[str, int], step: float) -> float:
    """One EGP round's budget: ``step`` times the nonzero weights of the eligible layers (those
    with entropy > 0 and weights left)."""
    return step * sum(remaining[n] for n in entropy if entropy[n] > 0 and remaining[n] > 0)
