"""global_smallest_counts: how many weights of each layer a global selection takes, without masks.

:func:`egp_fast.ops.global_smallest` returns one new bool mask per layer: one byte per weight,
the size of every mask of the model again. A method that only needs to know how many weights
each layer loses (IMP's plan; the masks are then made a few layers at a time by
:func:`egp_fast.ops.select_smallest`) asks :func:`global_smallest_counts` instead, which holds
no per-weight output at all.

The counts are those of :func:`~egp_fast.ops.global_smallest` exactly (the same rule: the
smallest ``|w|`` among the kept entries, ``-0.0 == 0.0``, NaN after ``+inf``, ties to the
earlier layer, then the lower index). Since ties inside one layer all count the same, a
layer's count is: its kept entries below the threshold key ``T``, plus its share of the ties at
``T``, handed out in layer order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from egp_fast.ops._dispatch import pick, register
from egp_fast.ops.select import _KEYS, _check_global, reference_global_smallest

# Entries keyed at a time by the torch backend: its scratch is a few bytes per entry of one chunk.
_CHUNK = 1 << 22
_DIGIT = 16  # bits of the key resolved per pass (one bincount of 65536 bins)


def _key_dtype(weights: Sequence[torch.Tensor]) -> torch.dtype:
    """The float dtype all layers are keyed in: their own when they share one, else fp32 (or
    fp64 when any layer is fp64); converting up is exact, so the ranking is unchanged."""
    dtypes = {w.dtype for w in weights}
    if len(dtypes) == 1:
        return dtypes.pop()
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _kept_keys(w: torch.Tensor, m: torch.Tensor, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """The integer keys of ``|w|`` (see :mod:`egp_fast.ops.select`) of the kept entries, as int64,
    one chunk of the layer at a time."""
    ints, nan_key = _KEYS[dtype]
    flat_w = w.detach().reshape(-1)
    flat_m = m.reshape(-1)
    for lo in range(0, flat_w.numel(), _CHUNK):
        part = flat_w[lo : lo + _CHUNK].to(dtype).view(ints)
        keys = torch.bitwise_and(part, torch.iinfo(ints).max).clamp_(max=nan_key)
        yield keys[flat_m[lo : lo + _CHUNK]].long()


@register("global_smallest_counts", "torch")
def torch_global_smallest_counts(
    weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], count: int
) -> list[int]:
    """The pure-PyTorch backend, on any device: a radix select of the threshold key 16 bits at a
    time (one ``torch.bincount`` per chunk and digit), then one counting pass. Its scratch is a
    few bytes per entry of one chunk of 2**22 entries, whatever the model's size.

    Args:
        weights, masks, count: as for :func:`global_smallest_counts` (already checked by it).

    Returns:
        Per layer, how many entries :func:`egp_fast.ops.global_smallest` sets ``False``.

    Example:
        >>> import torch
        >>> ws = [torch.tensor([0.5, 0.2]), torch.tensor([0.1, 0.9])]
        >>> torch_global_smallest_counts(ws, [torch.ones(2, dtype=torch.bool)] * 2, 2)
        [1, 1]
    """
    if count == 0 or not weights:
        return [0] * len(weights)
    dtype = _key_dtype(weights)
    if dtype not in _KEYS:  # another floating dtype: count the reference's masks
        return reference_global_smallest_counts(weights, masks, count)
    bits = torch.iinfo(_KEYS[dtype][0]).bits
    device = weights[0].device
    prefix, left = 0, count  # the key's digits found so far; entries still to take below/at it
    for done in range(0, bits, _DIGIT):
        shift = bits - done - _DIGIT
        hist = torch.zeros(1 << _DIGIT, dtype=torch.int64, device=device)
        for w, m in zip(weights, masks):
            for keys in _kept_keys(w, m, dtype):
                if done:
                    keys = keys[(keys >> (shift + _DIGIT)) == prefix]
                hist += torch.bincount((keys >> shift) & ((1 << _DIGIT) - 1), minlength=1 << _DIGIT)
        cum = hist.cumsum(0)
        digit = int(torch.searchsorted(cum, torch.tensor([left], device=device)).item())
        left -= int(cum[digit - 1]) if digit else 0
        prefix = (prefix << _DIGIT) | digit
    threshold, ties = prefix, left  # every kept key below threshold goes, and `ties` equal to it
    out = []
    for w, m in zip(weights, masks):
        below = equal = 0
        for keys in _kept_keys(w, m, dtype):
            below += int((keys < threshold).sum())
            equal += int((keys == threshold).sum())
        take = min(equal, ties)
        ties -= take
        out.append(below + take)
    return out


def reference_global_smallest_counts(
    weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], count: int
) -> list[int]:
    """Reference: the masks of :func:`egp_fast.ops.reference_global_smallest`, counted."""
    new = reference_global_smallest(weights, masks, count)
    return [int(m.count_nonzero()) - int(n.count_nonzero()) for m, n in zip(masks, new)]


def global_smallest_counts(
    weights: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    count: int,
    backend: str | None = None,
) -> list[int]:
    """How many weights of each layer :func:`egp_fast.ops.global_smallest` would prune.

    The same selection (exactly ``count`` of the smallest ``|w|`` among the kept weights of all
    layers, ranked as if concatenated in list order), but only its per-layer counts are
    returned: no new mask is made, so the call holds no memory per weight (the C++ backend
    reads every weight and mask once; the torch backend works a chunk at a time).

    Args:
        weights: one floating tensor per layer (not modified).
        masks: one bool tensor per layer, same shape, ``True`` = kept (not modified).
        count: total number of entries to prune, in ``[0, total kept]``.
        backend: ``None`` (automatic), ``"torch"`` or ``"cpp"``.

    Returns:
        One int per layer: the entries of that layer the selection sets ``False``; they sum to
        ``count``.

    Example:
        >>> import torch, egp_fast
        >>> ws = [torch.tensor([0.5, 0.2]), torch.tensor([0.1, 0.9])]
        >>> egp_fast.ops.global_smallest_counts(ws, [torch.ones(2, dtype=torch.bool)] * 2, 3)
        [2, 1]
    """
    weights, masks, count = _check_global(weights, masks, count, "global_smallest_counts")
    if not weights:
        return []
    _, fn = pick("global_smallest_counts", backend, weights[0].device)
    return [int(c) for c in fn(weights, masks, count)]
