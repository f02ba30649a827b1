"""masked_linear: ``y = x @ (W * M)^T + b`` with a bool mask ``M`` (True = kept).

The reference materialises ``W * M``; the Triton backend skips all-zero weight tiles and
never builds the masked weight. Gradients: ``dx = dy @ (W * M)``, ``dW = (dy^T x) * M``,
``db = sum(dy)``.

Tile maps. Fast backends cut the weight into ``block_n x block_k`` tiles and describe it by a
:class:`TileMap` (which tiles hold a kept nonzero, which hold a kept entry, whether pruned
entries still hold nonzero values). Building one reads the whole weight and mask and
synchronises with the host once, so :class:`~egp_fast.masks.MaskedLinear` keeps a
:class:`TileMapCache` and makes it visible to the backend for the duration of its call
(:func:`tile_map_cache_scope`); the map is rebuilt when the weight or the mask changes
(their ``_version`` counters, storage or identity). Plain calls of :func:`masked_linear`
share a small least-recently-used set of such caches (:func:`default_tile_map_cache`), so
calling it repeatedly on the same weight and mask tensors builds the map once too.

Masked-off entries contribute nothing in the fast backends, even when they hold NaN or inf
(the reference computes ``NaN * 0 = NaN`` there).
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from egp_fast.errors import ConfigError
from egp_fast.ops._dispatch import pick, register


@register("masked_linear", "torch")
def reference_masked_linear(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference: ``F.linear(x, weight * mask, bias)`` (autograd does the rest)."""
    return F.linear(x, weight * mask.to(weight.dtype), bias)


def masked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Linear layer with a pruning mask: ``x @ (weight * mask)^T + bias``.

    Args:
        x: ``[..., in_features]``.
        weight: ``[out_features, in_features]``.
        mask: bool, same shape as ``weight``; ``True`` = kept.
        bias: optional ``[out_features]``.
        backend: ``None`` (automatic), ``"torch"`` or ``"triton"``.

    Returns:
        ``[..., out_features]``, differentiable in ``x``, ``weight`` (masked) and ``bias``.

    Example:
        >>> import torch, egp_fast
        >>> w = torch.eye(2); m = torch.tensor([[True, False], [False, False]])
        >>> egp_fast.ops.masked_linear(torch.ones(1, 2), w, m)
        tensor([[1., 0.]])
    """
    if weight.dim() != 2:
        raise ConfigError(f"masked_linear: weight must be 2-d, got shape {tuple(weight.shape)}")
    if mask.shape != weight.shape or mask.dtype != torch.bool:
        raise ConfigError(
            f"masked_linear: mask must be a bool tensor of shape {tuple(weight.shape)}, got "
            f"{mask.dtype} {tuple(mask.shape)}"
        )
    if x.shape[-1] != weight.shape[1]:
        raise ConfigError(
            f"masked_linear: x has {x.shape[-1]} features in its last dim but weight expects "
            f"{weight.shape[1]}"
        )
    _, fn = pick("masked_linear", backend, x.device)
    return fn(x, weight, mask, bias)


@dataclass
class TileMap:
    """Which ``block_n x block_k`` weight tiles a masked matmul must visit.

    Attributes:
        block_n, block_k: the tile shape.
        occupancy: int8 ``[ceil(N/block_n), ceil(K/block_k)]``, 1 where a kept weight is nonzero.
        row_ptr, row_idx: int32 CSR lists of ``occupancy`` (per row-tile, its K-tiles).
        col_ptr, col_idx: int32 CSC lists of ``occupancy`` (per K-tile, its row-tiles).
        grad_tiles: int32 ``[T, 2]`` tiles holding at least one kept entry (the weight
            gradient can be nonzero only there).
        clean: True when the weight is already zero wherever the mask is False, so the
            kernels need not read the mask.
        density: fraction of occupied tiles (0 for an empty weight).
    """

    block_n: int
    block_k: int
    occupancy: torch.Tensor
    row_ptr: torch.Tensor
    row_idx: torch.Tensor
    col_ptr: torch.Tensor
    col_idx: torch.Tensor
    grad_tiles: torch.Tensor
    clean: bool
    density: float


def _tile_any(flags: torch.Tensor, block_n: int, block_k: int) -> torch.Tensor:
    n, k = flags.shape
    tn, tk = -(-n // block_n), -(-k // block_k)
    padded = F.pad(flags.to(torch.uint8), (0, tk * block_k - k, 0, tn * block_n - n))
    return padded.view(tn, block_n, tk, block_k).amax(dim=(1, 3)).to(torch.int8)


def reference_tile_occupancy(
    weight: torch.Tensor, mask: torch.Tensor, block_n: int, block_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch version of the tile maps: ``(occ, occ_mask, dirty)``, int8 per tile.

    Args:
        weight: ``[N, K]``.
        mask: bool ``[N, K]``, True = kept.
        block_n, block_k: tile shape.

    Returns:
        Any kept nonzero; any kept entry; any nonzero entry under a False mask bit.

    Example:
        >>> occ, occ_m, dirty = reference_tile_occupancy(torch.eye(4), torch.eye(4) > 0, 2, 2)
        >>> occ.tolist()
        [[1, 0], [0, 1]]
    """
    nz = weight.detach() != 0
    return (
        _tile_any(nz & mask, block_n, block_k),
        _tile_any(mask, block_n, block_k),
        _tile_any(nz & ~mask, block_n, block_k),
    )


def build_tile_map(
    weight: torch.Tensor,
    mask: torch.Tensor,
    block_n: int,
    block_k: int,
    occupancy_fn: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
) -> TileMap:
    """Build the :class:`TileMap` of ``weight`` under ``mask`` (one host synchronisation).

    Args:
        weight: ``[N, K]``.
        mask: bool ``[N, K]``.
        block_n, block_k: tile shape (the fast kernel's ``BLOCK_N``, ``BLOCK_K``).
        occupancy_fn: computes ``(occ, occ_mask, dirty)``; default
            :func:`reference_tile_occupancy` (the Triton backend passes its one-pass kernel).

    Returns:
        The tile map, on ``weight``'s device.

    Example:
        >>> tm = build_tile_map(torch.eye(4), torch.eye(4) > 0, 2, 2)
        >>> tm.row_idx.tolist(), tm.clean, tm.density
        ([0, 1], True, 0.5)
    """
    fn = occupancy_fn or reference_tile_occupancy
    occ_d, occ_m_d, dirty_d = fn(weight.detach(), mask, block_n, block_k)
    dev = occ_d.device
    # The maps are tiny (one byte per tile): one copy to the host, lists built there, one
    # copy back. Building them on the device would cost a host sync per nonzero() anyway.
    host = torch.stack([occ_d, occ_m_d, dirty_d]).cpu()
    occ, occ_m, dirty = host[0], host[1], host[2]
    zero = torch.zeros(1, dtype=torch.int32)
    row_ptr = torch.cat([zero, occ.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32)])
    col_ptr = torch.cat([zero, occ.sum(0, dtype=torch.int32).cumsum(0, dtype=torch.int32)])
    # nonzero() lists indices in row-major order: per row-tile, its K-tiles ascending.
    row_idx = occ.nonzero()[:, 1].to(torch.int32)
    col_idx = occ.t().nonzero()[:, 1].to(torch.int32)
    grad_tiles = occ_m.nonzero().to(torch.int32)
    parts = [row_ptr, row_idx, col_ptr, col_idx, grad_tiles.reshape(-1)]
    packed = torch.cat(parts).to(dev)
    views = list(packed.split([p.numel() for p in parts]))
    n_occ = row_idx.numel()
    total = occ.numel()
    return TileMap(
        block_n=block_n,
        block_k=block_k,
        occupancy=occ_d,
        row_ptr=views[0],
        row_idx=views[1],
        col_ptr=views[2],
        col_idx=views[3],
        grad_tiles=views[4].view(-1, 2),
        clean=not bool(dirty.any()),
        density=n_occ / total if total else 0.0,
    )


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t._version, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


class TileMapCache:
    """Holds the last :class:`TileMap` built for one (weight, mask) pair.

    The entry is reused while the *same* tensor objects are passed with unchanged
    ``_version`` counters, storage, shape and dtype, and the same tile shape; anything else
    rebuilds it. Objects are remembered through weak references, so a freed tensor whose id
    is reused can never hit the cache. Pickling or deep-copying drops the entry.

    Example:
        >>> cache = TileMapCache()
        >>> w, m = torch.eye(4), torch.eye(4) > 0
        >>> cache.get(w, m, 2, 2) is cache.get(w, m, 2, 2)
        True
    """

    def __init__(self) -> None:
        self._entry: tuple | None = None
        self.builds = 0

    def get(
        self,
        weight: torch.Tensor,
        mask: torch.Tensor,
        block_n: int,
        block_k: int,
        occupancy_fn: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
    ) -> TileMap:
        """The cached map if still valid, else a freshly built one (then cached)."""
        key = (_tensor_key(weight), _tensor_key(mask), block_n, block_k)
        e = self._entry
        if e is not None and e[0]() is weight and e[1]() is mask and e[2] == key:
            return e[3]
        tm = build_tile_map(weight, mask, block_n, block_k, occupancy_fn)
        self._entry = (weakref.ref(weight), weakref.ref(mask), key, tm)
        self.builds += 1
        return tm

    def clear(self) -> None:
        """Forget the cached map."""
        self._entry = None

    def __getstate__(self) -> dict:
        return {"builds": 0}

    def __setstate__(self, state: dict) -> None:
        self._entry = None
        self.builds = state.get("builds", 0)

    def __deepcopy__(self, memo: dict) -> TileMapCache:
        return TileMapCache()


_ACTIVE_CACHE: contextvars.ContextVar[TileMapCache | None] = contextvars.ContextVar(
    "egp_fast_tile_map_cache", default=None
)


@contextlib.contextmanager
def tile_map_cache_scope(cache: TileMapCache) -> Iterator[TileMapCache]:
    """Let the fast backends reuse ``cache`` for the :func:`masked_linear` calls inside.

    Example:
        >>> cache = TileMapCache()
        >>> with tile_map_cache_scope(cache):
        ...     y = masked_linear(torch.ones(1, 2), torch.eye(2), torch.eye(2) > 0)
    """
    token = _ACTIVE_CACHE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE_CACHE.reset(token)


def active_tile_map_cache() -> TileMapCache | None:
    """The cache installed by the innermost :func:`tile_map_cache_scope`, if any."""
    return _ACTIVE_CACHE.get()


# Plain calls outside any scope share these caches, one per (weight, mask) object pair, least
# recently used dropped first. Entries hold only weak references to the tensors, and a hit
# needs the same live objects with unchanged versions, so a stale map is never served.
_DEFAULT_CACHES: dict[tuple[int, int], TileMapCache] = {}
_DEFAULT_CACHE_SIZE = 32


def default_tile_map_cache(weight: torch.Tensor, mask: torch.Tensor) -> TileMapCache:
    """The shared cache slot for plain :func:`masked_linear` calls on this (weight, mask) pair.

    Example:
        >>> w, m = torch.eye(2), torch.eye(2) > 0
        >>> default_tile_map_cache(w, m) is default_tile_map_cache(w, m)
        True
    """
    key = (id(weight), id(mask))
    cache = _DEFAULT_CACHES.pop(key, None)
    if cache is None:
        cache = TileMapCache()
        if len(_DEFAULT_CACHES) >= _DEFAULT_CACHE_SIZE:
            _DEFAULT_CACHES.pop(next(iter(_DEFAULT_CACHES)))
    _DEFAULT_CACHES[key] = cache  # re-insert: most recently used last
    return cache
