"""Modules egp_fast can swap into a model.

:class:`MaskedLinear` is an ``nn.Linear`` that carries its pruning mask as the bool buffer
``weight_mask`` (the buffer name :mod:`egp_fast.masks` uses for every pruned layer) and
computes ``x @ (weight * weight_mask)^T + bias`` through :func:`egp_fast.ops.masked_linear`,
so on a GPU the zero tiles of a heavily pruned layer are skipped.
"""

from __future__ import annotations

import torch
from torch import nn

from egp_fast.errors import ConfigError
from egp_fast.ops.masked_linear import TileMapCache, masked_linear, tile_map_cache_scope


class MaskedLinear(nn.Linear):
    """``nn.Linear`` with a bool pruning mask (True = kept) and a tile-skipping forward.

    The module keeps a tile-occupancy map of its masked weight (which weight tiles the fast
    kernel must visit) and rebuilds it only when the weight or the mask changes (their
    version counters, storage or identity), so inference pays for it once.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        backend: ``None`` (automatic), ``"torch"`` or ``"triton"``; passed to
            :func:`egp_fast.ops.masked_linear` on every call.

    Example:
        >>> import torch
        >>> layer = MaskedLinear.from_linear(torch.nn.Linear(4, 3))
        >>> layer.weight_mask[0] = False
        >>> bool((layer(torch.randn(2, 4))[:, 0] == layer.bias[0]).all())
        True
    """

    weight_mask: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        backend: str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer(
            "weight_mask", torch.ones(out_features, in_features, dtype=torch.bool, device=self.weight.device)
        )
        self.backend = backend
        self._tile_cache = TileMapCache()

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, mask: torch.Tensor | None = None, backend: str | None = None
    ) -> MaskedLinear:
        """Wrap ``linear``: the new module shares its ``weight`` and ``bias`` Parameters.

        Args:
            linear: the layer to replace (not modified).
            mask: bool ``[out, in]``; default: the layer's own ``weight_mask`` buffer if it has
                one, else all True. Copied into the new module's buffer.
            backend: see the class docstring.

        Returns:
            A ``MaskedLinear`` whose ``weight``/``bias`` are the SAME Parameter objects, so
            optimizers and references held elsewhere stay valid.

        Example:
            >>> import torch
            >>> lin = torch.nn.Linear(3, 2)
            >>> MaskedLinear.from_linear(lin).weight is lin.weight
            True
        """
        if not isinstance(linear, nn.Linear):
            raise ConfigError(f"MaskedLinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        if mask is None:
            mask = getattr(linear, "weight_mask", None)
        w = linear.weight
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != w.shape:
                got = (
                    f"{mask.dtype} {tuple(mask.shape)}"
                    if isinstance(mask, torch.Tensor)
                    else type(mask).__name__
                )
                raise ConfigError(
                    f"MaskedLinear.from_linear: mask must be a bool tensor of shape {tuple(w.shape)}, got {got}"
                )
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features = linear.in_features
        new.out_features = linear.out_features
        new.weight = w
        new.bias = linear.bias
        new.register_buffer(
            "weight_mask",
            mask.detach().to(w.device).clone()
            if mask is not None
            else torch.ones(w.shape, dtype=torch.bool, device=w.device),
        )
        new.backend = backend
        new._tile_cache = TileMapCache()
        new.train(linear.training)
        return new

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this module's ``weight``/``bias`` Parameters.

        The mask is not applied to the weight: under ``Pruner`` the pruned weights are already
        zero, otherwise multiply ``weight`` by ``weight_mask`` first if that is what you want.

        Example:
            >>> import torch
            >>> m = MaskedLinear(3, 2)
            >>> m.to_linear().weight is m.weight
            True
        """
        lin = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(lin)
        lin.in_features = self.in_features
        lin.out_features = self.out_features
        lin.weight = self.weight
        lin.bias = self.bias
        lin.train(self.training)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ (weight * weight_mask)^T + bias`` (tile-skipping on fast backends)."""
        with tile_map_cache_scope(self._tile_cache):
            return masked_linear(x, self.weight, self.weight_mask, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        kept = int(self.weight_mask.sum()) if self.weight_mask.numel() else 0
        return f"{super().extra_repr()}, kept={kept}/{self.weight_mask.numel()}"


__all__ = ["MaskedLinear"]
