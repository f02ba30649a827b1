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
        s = {k: entropy[k] * magnitude[k] for k in pool}
        total = math.fsum(s.values())
        irr = {k: total / s[k] for k in pool}
        top = max(irr.values())
        e = {k: math.exp(irr[k] - top) for k in pool}
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
