"""Conv/linear geometry for the folding passes: weights with masks applied, padding, new layers,
kernel composition and FLOP counts.

Pure tensor helpers with no graph in sight: :class:`~egp_fast.folding.fold.Folder` and the merges
of :mod:`egp_fast.folding.merges` read a layer's weight and bias here (``_w``/``_b``, the pruning
mask applied), its geometry (``_geom``: integer padding, or None for unsupported convs), build
replacement layers (``_new_conv``, ``_new_linear``, ``_rebuild``) and compose two convs
(:func:`compose_conv_weight`); :func:`layer_flops` prices a layer for ``fold="auto"``.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn as nn

__all__ = ["compose_conv_weight", "layer_flops"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _w(m: nn.Module) -> torch.Tensor:
    w = m.weight.detach()
    mask = getattr(m, "weight_mask", None)
    return w * mask.to(w.dtype) if isinstance(mask, torch.Tensor) else w


def _b(m: nn.Module, n: int, like: torch.Tensor) -> torch.Tensor:
    return m.bias.detach() if getattr(m, "bias", None) is not None else torch.zeros(n, dtype=like.dtype, device=like.device)


def _geom(m: nn.Module) -> dict[str, Any] | None:
    """Conv geometry with integer padding, or None when unsupported (non-zero padding modes)."""
    if not isinstance(m, _CONVS) or m.padding_mode != "zeros" or getattr(m, "transposed", False):
        return None
    nd = m.weight.dim() - 2
    k = tuple(m.kernel_size)
    d = tuple(m.dilation)
    s = tuple(m.stride)
    if isinstance(m.padding, str):
        if m.padding == "valid":
            p = (0,) * nd
        else:  # "same": symmetric only when every total padding is even
            tot = [di * (ki - 1) for di, ki in zip(d, k)]
            if any(t % 2 for t in tot):
                return None
            p = tuple(t // 2 for t in tot)
    else:
        p = tuple(m.padding)
    return {"nd": nd, "k": k, "s": s, "d": d, "p": p, "g": m.groups}


def _new_conv(nd: int, weight: torch.Tensor, bias: torch.Tensor, stride, padding, dilation, groups: int) -> nn.Module:
    cls = _CONVS[nd - 1]
    cout, cin_g = weight.shape[:2]
    # skip_init: no random initialisation of weights that are overwritten at once.
    conv = torch.nn.utils.skip_init(cls, cin_g * groups, cout, tuple(weight.shape[2:]), stride=tuple(stride),
                                    padding=tuple(padding), dilation=tuple(dilation), groups=groups, bias=True,
                                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return conv


def _new_linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    lin = torch.nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=True, device=weight.device,
                                   dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        lin.bias.copy_(bias)
    return lin


def _dense(w: torch.Tensor, groups: int) -> torch.Tensor:
    """Block-diagonal ``[Cout, Cin, *k]`` weight of a grouped conv."""
    if groups == 1:
        return w
    cout, cin_g = w.shape[:2]
    og = cout // groups
    out = w.new_zeros((cout, cin_g * groups) + tuple(w.shape[2:]))
    for i in range(groups):
        out[i * og:(i + 1) * og, i * cin_g:(i + 1) * cin_g] = w[i * og:(i + 1) * og]
    return out


def compose_conv_weight(w1: torch.Tensor, w2: torch.Tensor, s1, d1, d2, groups: int = 1) -> torch.Tensor:
    """Kernel of ``conv2 ∘ conv1`` (no bias): span ``(k1-1)·d1 + (k2-1)·d2·s1 + 1`` per dim.

    Args:
        w1: ``[M, Cin/g, *k1]``; w2: ``[Cout, M/g, *k2]``; both grouped by ``groups``.
        s1, d1: stride and dilation of conv1; d2: dilation of conv2 (tuples).

    Returns:
        ``[Cout, Cin/g, *K]`` for a conv of stride ``s1·s2``, dilation 1, ``groups`` groups.
    """
    nd = w1.dim() - 2
    m, cin_g = w1.shape[:2]
    cout = w2.shape[0]
    g = groups
    k1, k2 = w1.shape[2:], w2.shape[2:]
    span = [(k1[i] - 1) * d1[i] + (k2[i] - 1) * d2[i] * s1[i] + 1 for i in range(nd)]
    a = w1.reshape(g, m // g, cin_g, *k1)
    b = w2.reshape(g, cout // g, m // g, *k2)
    out = w1.new_zeros((g, cout // g, cin_g, *span))
    for j in itertools.product(*[range(x) for x in k2]):
        part = torch.einsum("gom,gmc...->goc...", b[(slice(None),) * 3 + j], a)
        idx = [slice(j[i] * d2[i] * s1[i], j[i] * d2[i] * s1[i] + (k1[i] - 1) * d1[i] + 1, d1[i]) for i in range(nd)]
        out[(slice(None),) * 3 + tuple(idx)] += part
    return out.reshape(cout, cin_g, *span)


def _conv_out(size: int, k: int, s: int, d: int, p: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def layer_flops(m: nn.Module, out_shape: tuple[int, ...]) -> int:
    """Multiply-add FLOPs (2 per MAC) of a conv/linear producing ``out_shape``."""
    numel = 1
    for x in out_shape:
        numel *= int(x)
    if isinstance(m, _CONVS):
        per = (m.in_channels // m.groups)
        for k in m.kernel_size:
            per *= k
        return 2 * numel * per
    if isinstance(m, nn.Linear):
        return 2 * numel * m.in_features
    return 0


def _rebuild(a: nn.Module, w: torch.Tensor, b: torch.Tensor) -> nn.Module:
    """A new layer of ``a``'s type and geometry with weight ``w`` and bias ``b``."""
    if isinstance(a, nn.Linear):
        return _new_linear(w, b)
    g = _geom(a)
    return _new_conv(g["nd"], w, b, g["s"], g["p"], g["d"], g["g"])
