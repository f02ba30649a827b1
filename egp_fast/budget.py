"""How a round's pruning budget is shared between layers (EGP.md, "One pruning round" 4-6).

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


def _softmax_weights(entropy: Mapping[str, float], magnitude: Mapping[str, float], pool: list[str]) -> dict:
    """``exp(I_k - max I)`` for the layers in ``pool``, ``I_k = sum_j s_j / s_k``, ``s = H * mean|w|``."""
    s = {k: entropy[k] * magnitude[k] for k in pool}
    total = math.fsum(s.values())
    if all(v > 0 for v in s.values()) and math.isfinite(total):
        irr = {k: total / s[k] for k in pool}
        top = max(irr.values())
        if math.isfinite(top):
            return {k: math.exp(irr[k] - top) for k in pool}
    # A product s underflowed to 0 (tiny entropy times tiny weights), the sum overflowed, or
    # some I_k overflowed: the plain formula would divide by zero or give inf - inf = NaN.
    # Work with log s instead (H and |w| are > 0 and finite here).
    logs = {k: math.log(entropy[k]) + math.log(magnitude[k]) for k in pool}
    big = max(logs.values())
    log_total = big + math.log(math.fsum(math.exp(v - big) for v in logs.values()))
    log_irr = {k: log_total - logs[k] for k in pool}
    top = max(log_irr.values())
    if top < 700.0:  # every I_k fits a float: the ordinary softmax
        irr = {k: math.exp(v) for k, v in log_irr.items()}
        peak = max(irr.values())
        return {k: math.exp(irr[k] - peak) for k in pool}
    # max I > 1e304: a layer whose log I differs from the top by even one ulp lies more than
    # 1e290 below it, so its softmax weight is exactly 0; ties with the top share equally.
    return {k: 1.0 if log_irr[k] == top else 0.0 for k in pool}


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
    _check(entropy, magnitude, remaining, budget)
    alloc = {k: 0 for k in entropy}
    pool = sorted(
        k for k in entropy if entropy[k] > 0 and remaining[k] > 0 and magnitude[k] > 0
    )
    left = float(min(budget, math.fsum(remaining[k] for k in pool)))
    while pool and left > 0:
        e = _softmax_weights(entropy, magnitude, pool)
        z = math.fsum(e.values())
        share = {k: left * e[k] / z for k in pool}
        capped = [k for k in pool if share[k] >= remaining[k]]
        if not capped:
            for k in pool:
                alloc[k] = min(int(math.floor(share[k])), int(remaining[k]))
            break
        for k in capped:
            alloc[k] = int(remaining[k])
            left -= remaining[k]
        pool = [k for k in pool if k not in capped]
    return alloc
