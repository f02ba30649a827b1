"""select_smallest / global_smallest: exact-k magnitude selection among unpruned weights.

Semantics (shared by every backend, tested for exact equality):

* Masks are bool tensors with ``True`` = kept (``torch.nn.utils.prune``'s polarity).
* Among the weights whose mask is ``True``, the ``k`` with the smallest ``|w|`` are set to
  ``False``; exactly ``k``, never more, never fewer.
* Ties are broken by the lower flat index first (row-major ``reshape(-1)`` order). For the
  global variant the order is the concatenation of the layers in list order.
* ``-0.0`` equals ``0.0``; ``inf`` is larger than every finite value; **NaN is never
  smaller than anything**: all NaNs rank after ``+inf`` (and among themselves by index), so a
  NaN weight is pruned only when ``k`` reaches into them.
* ``k`` must lie in ``[0, number of True entries]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from egp_fast.errors import ConfigError
from egp_fast.ops._dispatch import pick, register


def _check_pair(i: int, w: torch.Tensor, m: torch.Tensor, where: str) -> None:
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise ConfigError(f"{where}: weights[{i}] must be a floating-point tensor")
    if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
        got = m.dtype if isinstance(m, torch.Tensor) else type(m).__name__
        raise ConfigError(f"{where}: masks[{i}] must be a bool tensor (True = kept), got {got}")
    if m.shape != w.shape:
        raise ConfigError(
            f"{where}: masks[{i}] has shape {tuple(m.shape)} but weights[{i}] has "
            f"{tuple(w.shape)}; each mask must match its weight"
        )
    if m.device != w.device:
        raise ConfigError(f"{where}: masks[{i}] is on {m.device} but weights[{i}] on {w.device}")


def _check_lists(weights, masks, where: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    weights, masks = list(weights), list(masks)
    if len(weights) != len(masks):
        raise ConfigError(
            f"{where}: got {len(weights)} weights but {len(masks)} masks; pass one mask per weight"
        )
    for i, (w, m) in enumerate(zip(weights, masks)):
        _check_pair(i, w, m, where)
    if weights:
        dev = weights[0].device
        for i, w in enumerate(weights):
            if w.device != dev:
                raise ConfigError(
                    f"{where}: weights[{i}] is on {w.device} but weights[0] on {dev}; "
                    "put all layers on one device"
                )
    return weights, masks


def _order(keys: torch.Tensor) -> torch.Tensor:
    # Stable sort puts NaN after +inf and keeps index order among equal keys (NaNs included).
    return torch.sort(keys, stable=True).indices


# Integer keys of |w|: the IEEE bits of a non-negative float, read as an integer, order like the
# value (+0.0 and -0.0 both give 0); every NaN is clamped to one key just above +inf, so NaNs rank
# last and among themselves by index. Per float width: (integer dtype, key of the canonical NaN).
_KEYS = {
    torch.float16: (torch.int16, 0x7C01),
    torch.bfloat16: (torch.int16, 0x7F81),
    torch.float32: (torch.int32, 0x7F800001),
    torch.float64: (torch.int64, 0x7FF0000000000001),
}


def _keys(w: torch.Tensor, m: torch.Tensor, n_pruned: int) -> torch.Tensor:
    """Flat integer keys of ``|w|``; when some entries are pruned, key + 1 where kept and 0 where
    pruned, so the pruned rank first."""
    ints, nan_key = _KEYS[w.dtype]
    bits = w.detach().reshape(-1).view(ints)
    keys = torch.bitwise_and(bits, torch.iinfo(ints).max)  # clear the sign bit: |w|
    keys.clamp_(max=nan_key)
    if n_pruned:
        # a product with the bool mask, not masked_fill: ATen does not vectorize masked_fill on
        # the CPU (8x slower there)
        keys.add_(1).mul_(m.reshape(-1))
    return keys


def _kth_select(w: torch.Tensor, m: torch.Tensor, k: int) -> torch.Tensor:
    """One layer of the torch backend: ``torch.kthvalue`` on integer keys, ties by index."""
    out = m.clone(memory_format=torch.contiguous_format)
    if k == 0:
        return out
    if w.dtype not in _KEYS:  # any other floating dtype: the sort-based reference
        return reference_select_smallest([w], [m], [k])[0]
    n = m.numel()
    n_pruned = n - int(m.count_nonzero())
    keys = _keys(w, m, n_pruned)
    total = n_pruned + k  # the already pruned (lowest keys) come first, then the k to prune
    t = torch.kthvalue(keys, total).values
    flat = out.view(-1)
    torch.gt(keys, t, out=flat)  # every entry above the k-th key stays; pruned ones are below it
    ties = torch.eq(keys, t).nonzero().squeeze(1)
    below = n - int(flat.count_nonzero()) - ties.numel()
    need = total - below  # entries equal to the k-th key that must go, lowest index first
    if need < ties.numel():
        flat[ties[need:]] = True
    return out


@register("select_smallest", "torch")
def torch_select_smallest(
    weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], counts: Sequence[int]
) -> list[torch.Tensor]:
    """The pure-PyTorch backend (what a build without the extension runs): per layer, the k-th
    smallest integer key of ``|w|`` by ``torch.kthvalue`` and comparisons, pruned entries ranked
    first. Same results as :func:`reference_select_smallest`, bit for bit (the reference sorts
    every layer's kept entries, which is several times slower).

    Args:
        weights, masks, counts: as for :func:`select_smallest` (already checked by it).

    Returns:
        New contiguous bool masks, one per layer.

    Example:
        >>> import torch
        >>> w = torch.tensor([0.3, -0.1, 0.1, 2.0])
        >>> torch_select_smallest([w], [torch.tensor([True, True, False, True])], [1])
        [tensor([ True, False, False,  True])]
    """
    jobs = list(zip(weights, masks, [int(k) for k in counts]))
    workers = min(torch.get_num_threads(), len(jobs))
    if workers < 2 or sum(w.numel() for w in weights) < _PARALLEL_MIN:
        return [_kth_select(w, m, k) for w, m, k in jobs]
    # torch.kthvalue runs on one core; layers are independent, so run them side by side (torch
    # releases the GIL inside its ops), biggest first so the last one to start is small.
    from concurrent.futures import ThreadPoolExecutor

    order = sorted(range(len(jobs)), key=lambda i: -jobs[i][0].numel())
    out: list[torch.Tensor | None] = [None] * len(jobs)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {i: pool.submit(_kth_select, *jobs[i]) for i in order}
        for i, f in futures.items():
            out[i] = f.result()
    return out  # type: ignore[return-value]


# Below this many weights in a call, one thread is faster than starting a pool.
_PARALLEL_MIN = 1 << 20


def reference_select_smallest(
    weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], counts: Sequence[int]
) -> list[torch.Tensor]:
    """Reference: per layer, a stable sort of ``|w|`` over the kept entries."""
    out = []
    for w, m, k in zip(weights, masks, counts):
        # contiguous_format: clone() keeps a channels-last/transposed mask's strides, and
        # reshape(-1) of such a mask is a copy, so the writes below would be lost.
        new = m.clone(memory_format=torch.contiguous_format)
        if k > 0:
            flat = new.reshape(-1)
            idx = flat.nonzero().squeeze(1)
            keys = w.detach().reshape(-1)[idx].abs()
            flat[idx[_order(keys)[:k]]] = False
        out.append(new)
    return out


@register("global_smallest", "torch")
def reference_global_smallest(
    weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], count: int
) -> list[torch.Tensor]:
    """Reference: one stable sort over the kept entries of all layers, concatenated."""
    # contiguous_format: reshape(-1) must be a view for the writes below to land (see above).
    out = [m.clone(memory_format=torch.contiguous_format) for m in masks]
    if count == 0 or not out:
        return out
    idxs = [m.reshape(-1).nonzero().squeeze(1) for m in out]
    # float64 holds fp16/bf16/fp32 values exactly, so mixed-dtype layers rank correctly.
    keys = torch.cat([w.detach().reshape(-1)[i].abs().double() for w, i in zip(weights, idxs)])
    chosen = _order(keys)[:count]
    offsets = torch.tensor([0] + [len(i) for i in idxs], device=keys.device).cumsum(0)
    for layer, (m, i) in enumerate(zip(out, idxs)):
        lo, hi = offsets[layer], offsets[layer + 1]
        sel = chosen[(chosen >= lo) & (chosen < hi)] - lo
        m.reshape(-1)[i[sel]] = False
    return out


def _remaining(m: torch.Tensor) -> int:
    # count_nonzero, not sum: a bool sum casts to an int64 copy first (8 bytes per weight: twice
    # an fp32 layer, for a check).
    return int(m.count_nonzero())


def _check_global(weights, masks, count, where: str) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """The lists checked, and ``count`` checked against the unpruned weights of all layers."""
    weights, masks = _check_lists(weights, masks, where)
    count = int(count)
    left = sum(_remaining(m) for m in masks)
    if count < 0 or count > left:
        raise ConfigError(
            f"{where}: count={count} must be in [0, {left}] (the number of weights still unpruned "
            "across the layers)"
        )
    return weights, masks, count


def select_smallest(
    weights: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    counts: Sequence[int],
    backend: str | None = None,
) -> list[torch.Tensor]:
    """Per layer, prune exactly ``counts[i]`` more weights: the smallest ``|w|`` among kept.

    Args:
        weights: one floating tensor per layer (any shape; not modified).
        masks: one bool tensor per layer, same shape, ``True`` = kept (not modified).
        counts: how many more entries to set ``False`` in each layer; each in
            ``[0, masks[i].sum()]``.
        backend: ``None`` (automatic), ``"torch"``, ``"cpp"`` or ``"cuda"``.

    Returns:
        New bool masks (one per layer). Ties go to the lower flat index; NaN ranks last.

    Example:
        >>> import torch, egp_fast
        >>> w = torch.tensor([0.3, -0.1, 0.1, 2.0])
        >>> egp_fast.ops.select_smallest([w], [torch.ones(4, dtype=torch.bool)], [2])
        [tensor([ True, False, False,  True])]
    """
    weights, masks = _check_lists(weights, masks, "select_smallest")
    counts = [int(c) for c in counts]
    if len(counts) != len(weights):
        raise ConfigError(
            f"select_smallest: got {len(counts)} counts for {len(weights)} layers; "
            "pass one count per layer"
        )
    for i, (m, k) in enumerate(zip(masks, counts)):
        if k < 0:
            raise ConfigError(f"select_smallest: counts[{i}]={k} is negative; counts must be >= 0")
        left = _remaining(m)
        if k > left:
            raise ConfigError(
                f"select_smallest: counts[{i}]={k} but only {left} weights of layer {i} are "
                "still unpruned; ask for at most that many"
            )
    if not weights:
        return []
    _, fn = pick("select_smallest", backend, weights[0].device)
    return fn(weights, masks, counts)


def global_smallest(
    weights: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    count: int,
    backend: str | None = None,
) -> list[torch.Tensor]:
    """Prune exactly ``count`` more weights across all layers: one global magnitude ranking.

    The same rule as :func:`select_smallest` with a single budget; layers are ranked as if
    concatenated in list order (ties go to the earlier layer, then the lower index), but no
    backend other than the reference actually concatenates them.

    Args:
        weights: one floating tensor per layer.
        masks: one bool tensor per layer, ``True`` = kept.
        count: total number of entries to set ``False``, in ``[0, total kept]``.
        backend: ``None`` (automatic), ``"torch"``, ``"cpp"`` or ``"cuda"``.

    Returns:
        New bool masks, one per layer.

    Example:
        >>> import torch, egp_fast
        >>> ws = [torch.tensor([0.5, 0.2]), torch.tensor([0.1, 0.9])]
        >>> ms = [torch.ones(2, dtype=torch.bool)] * 2
        >>> egp_fast.ops.global_smallest(ws, ms, 2)
        [tensor([ True, False]), tensor([False,  True])]
    """
    weights, masks, count = _check_global(weights, masks, count, "global_smallest")
    if not weights:
        return []
    _, fn = pick("global_smallest", backend, weights[0].device)
    return fn(weights, masks, count)
