"""Per-channel affine maps: what a zero-entropy (or EASIER-removed) activation site becomes.

A site whose every channel stays in one linear piece of its activation on the data (docs/algorithm.md,
"Collapse") computes ``y = scale[c] * z + shift[c]`` there: identity for always-ON ReLU
channels, zero for always-OFF ones, the slope for LeakyReLU/PReLU, the clip value or the
identity for ReLU6/Hardtanh. :class:`ChannelAffine` is that map as a module, :func:`site_affine`
computes its ``(scale, shift)`` from the piece of each channel, and the private helpers below
build the map of one site from its statistics (used by :mod:`egp_fast.folding.linearizer`).

What a site becomes (``how``, one of :data:`LINEARIZATIONS`):

* ``"data"``: the piece each channel never left on the data. Only zero-entropy sites qualify;
  the map equals the activation on every measured sample.
* ``"identity"`` (EASIER's choice): ``y = z`` on every channel, whatever the data says.
* ``"majority"``: per channel, the piece it sat in most often: identity where ``p_on >= 0.5``,
  zero (or the negative slope) otherwise; for ReLU6/Hardtanh the most frequent of the three
  pieces (ties: the lower piece), from ``SiteStats.piece_counts``.

``identity`` and ``majority`` replace a site even when it still changes state on the data: the
network's function changes, which is the point of EASIER (fine-tuning recovers the accuracy).
Such a :class:`ChannelAffine` has ``exact=False``, so :func:`egp_fast.collapse` reports it as an
approximation; a map that agrees with the data on every channel keeps ``exact=True`` (unless
the activation is smooth: GELU/SiLU are never exactly affine).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from egp_fast.errors import ConfigError, ModelError
from egp_fast.graph import function_params, module_kind, module_params

__all__ = ["LINEARIZATIONS", "ChannelAffine", "site_affine"]

#: Ways :func:`egp_fast.linearize` can replace a site (see the module docstring).
LINEARIZATIONS = ("data", "identity", "majority")


def _channel_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[dim] = -1
    return x * scale.view(shape).to(x.dtype) + shift.view(shape).to(x.dtype)


# Traced as one call (fx cannot build ``[1] * x.dim()`` from a Proxy); the collapse pass
# recognises the node and turns it back into a ChannelAffine.
fx.wrap("_channel_affine")


class ChannelAffine(nn.Module):
    """``y = x * scale[c] + shift[c]`` along one channel axis: a linearised activation site.

    Args:
        scale: float tensor ``[C]``.
        shift: float tensor ``[C]``.
        channel_dim: the channel axis of the input (1 for ``[N, C, ...]``, -1 for tokens).
        exact: False when it only approximates the site it replaced: a smooth activation
            (GELU, SiLU), or a site that still changed state on the data and was replaced by
            the identity or its majority piece (EASIER).
        site: the name of the site it replaced (for reports).
        how: how the map was chosen: ``"data"``, ``"identity"`` or ``"majority"`` (see
            :func:`egp_fast.linearize`).

    Example:
        >>> m = ChannelAffine(torch.tensor([1.0, 0.0]), torch.zeros(2), channel_dim=1)
        >>> m(torch.ones(1, 2, 3, 3))[0, :, 0, 0]
        tensor([1., 0.])
    """

    def __init__(
        self,
        scale: torch.Tensor,
        shift: torch.Tensor,
        channel_dim: int = 1,
        exact: bool = True,
        site: str = "",
        how: str = "data",
    ) -> None:
        super().__init__()
        if scale.shape != shift.shape or scale.dim() != 1:
            raise ConfigError(
                f"ChannelAffine needs scale and shift of the same shape [C]; got "
                f"{list(scale.shape)} and {list(shift.shape)}"
            )
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())
        self.channel_dim = int(channel_dim)
        self.exact = bool(exact)
        self.site = site
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _channel_affine(x, self.scale, self.shift, self.channel_dim)

    def is_identity(self) -> bool:
        return bool((self.scale == 1).all()) and bool((self.shift == 0).all())

    def extra_repr(self) -> str:
        on = int((self.scale == 1).sum())
        zero = int(((self.scale == 0) & (self.shift == 0)).sum())
        return (
            f"channels={self.scale.numel()}, channel_dim={self.channel_dim}, identity={on}, "
            f"zero={zero}, exact={self.exact}, site={self.site!r}, how={self.how!r}"
        )


def site_affine(
    kind: str,
    piece: torch.Tensor,
    params: dict[str, Any] | None = None,
    prelu_weight: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)`` of an activation whose channels sit in fixed pieces.

    Args:
        kind: the site's activation (``relu``, ``relu6``, ``hardtanh``, ``leaky_relu``,
            ``prelu``, ``gelu``, ``silu``).
        piece: int64 ``[C]``: the piece each channel stays in (``SiteStats.piece``); every
            entry must be >= 0.
        params: activation parameters (``Site.params``: ``negative_slope``, ``min_val``,
            ``max_val``).
        prelu_weight: the PReLU slopes (one, or one per channel) for ``kind="prelu"``.
        dtype: dtype of the result.

    Returns:
        ``(scale, shift)``, each ``[C]``.

    Raises:
        ConfigError: a channel is not constant, or the kind is unknown.

    Example:
        >>> site_affine("relu", torch.tensor([0, 1]))
        (tensor([0., 1.]), tensor([0., 0.]))
    """
    params = params or {}
    piece = piece.to(torch.int64).cpu()
    if bool((piece < 0).any()):
        raise ConfigError(
            f"site_affine: {int((piece < 0).sum())} channel(s) change piece on the data; only "
            "zero-entropy sites (every channel constant) can be linearised"
        )
    c = piece.numel()
    scale = torch.zeros(c, dtype=torch.float64)
    shift = torch.zeros(c, dtype=torch.float64)
    on = piece == 1
    if kind in ("relu", "gelu", "silu", "leaky_relu", "prelu"):
        if bool((piece > 1).any()):
            raise ConfigError(f"site_affine: a {kind} site has two pieces, got piece {int(piece.max())}")
        scale[on] = 1.0
        if kind == "leaky_relu":
            scale[~on] = float(params.get("negative_slope", 0.01))
        elif kind == "prelu":
            if prelu_weight is None:
                raise ConfigError("site_affine: kind='prelu' needs prelu_weight (the PReLU slopes)")
            w = prelu_weight.detach().to(torch.float64).cpu().reshape(-1)
            w = w.expand(c) if w.numel() == 1 else w
            if w.numel() != c:
                raise ConfigError(f"site_affine: PReLU has {w.numel()} slopes for {c} channels")
            scale[~on] = w[~on]
    elif kind in ("relu6", "hardtanh"):
        lo = float(params.get("min_val", 0.0 if kind == "relu6" else -1.0))
        hi = float(params.get("max_val", 6.0 if kind == "relu6" else 1.0))
        if bool((piece > 2).any()):
            raise ConfigError(f"site_affine: a {kind} site has three pieces, got piece {int(piece.max())}")
        scale[on] = 1.0
        shift[piece == 0] = lo
        shift[piece == 2] = hi
    else:
        raise ConfigError(f"site_affine: unknown activation kind {kind!r}")
    return scale.to(dtype), shift.to(dtype)

# --------------------------------------------------------------------------------------------
# The map of one site, from its statistics.


def _module_site_kind_params(m: nn.Module) -> dict[str, Any]:
    kind = module_kind(m)
    return module_params(kind, m) if kind else {}


def _target_piece(st: Any, how: str) -> torch.Tensor:
    """The piece each channel of a site is mapped to: int64 ``[C]`` on the CPU.

    ``data``: the piece it never left (the site must be at zero entropy); ``identity``: the
    linear piece ``y = z`` (piece 1 for every supported kind); ``majority``: the piece it sat
    in most often (two pieces: ON when ``p_on >= 0.5``; more: ``piece_counts.argmax``, which
    returns the lower piece on a tie).
    """
    channels = int(st.piece.numel())
    if how == "data":
        return st.piece.to(torch.int64).cpu()
    if how == "identity":
        return torch.ones(channels, dtype=torch.int64)
    if len(st.breakpoints) <= 1:
        return (st.p_on.cpu() >= 0.5).to(torch.int64)
    return st.piece_counts.cpu().argmax(0).to(torch.int64)


def _is_exact(st: Any, piece: torch.Tensor) -> bool:
    """True when the affine map equals the activation on every measured observation."""
    return bool(st.exact) and bool(st.collapsible) and torch.equal(piece, st.piece.to(torch.int64).cpu())


def _affine_for(node: fx.Node, owner: nn.Module, st: Any, how: str = "data") -> ChannelAffine:
    """The ChannelAffine replacing one activation call, from its statistics."""
    prelu_w = None
    if node.op == "call_module":
        m = owner.get_submodule(node.target)
        params = _module_site_kind_params(m)
        if st.kind == "prelu":
            prelu_w = m.weight
    else:
        params = function_params(st.kind, node) if node.op == "call_function" else {}
        if st.kind == "prelu":
            w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if not (isinstance(w, fx.Node) and w.op == "get_attr"):
                raise ModelError(f"site {st.name}: the PReLU slopes are not a module attribute")
            prelu_w = owner.get_parameter(w.target)
    dtype = torch.float32
    for p in owner.parameters():
        if p.is_floating_point():
            dtype = p.dtype
            break
    piece = _target_piece(st, how)
    scale, shift = site_affine(st.kind, piece, params, prelu_w, dtype=dtype)
    device = next((b.device for b in owner.buffers()), None) or next(
        (p.device for p in owner.parameters()), torch.device("cpu")
    )
    return ChannelAffine(scale.to(device), shift.to(device), st.channel_dim, _is_exact(st, piece), st.name, how)
