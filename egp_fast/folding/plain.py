"""The working copy :func:`egp_fast.collapse` folds: a deep copy of the model with its masks
applied and stripped, and every linear-like layer (a masked ``nn.Linear`` subclass,
transformers' ``Conv1D``) made a plain ``nn.Linear``, so the folding passes see one kind of
linear layer."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from egp_fast.masks import strip_masks


def _is_conv1d(m: nn.Module) -> bool:
    """Transformers' ``Conv1D`` (GPT-2): ``y = x @ W + b`` with ``W`` of shape ``[in, out]``.

    Recognised by its name and what it computes (one probe on a small input), so transformers
    need not be importable and a different layer that happens to share the name is left alone.
    """
    w = getattr(m, "weight", None)
    if not (type(m).__name__ == "Conv1D" and isinstance(getattr(m, "nf", None), int)
            and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[1] == m.nf):
        return False
    b = getattr(m, "bias", None)
    with torch.no_grad():
        x = torch.randn(3, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
        want = x @ w + (b if isinstance(b, torch.Tensor) else 0)
        try:
            got = m(x)
        except Exception:
            return False
    return isinstance(got, torch.Tensor) and got.shape == want.shape and bool(
        torch.allclose(got, want, rtol=1e-3, atol=1e-3 * (1 + float(want.abs().max()))))


def _plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy with masks applied and stripped, and linear-like layers made ``nn.Linear``.

    Masked linear layers (subclasses of ``nn.Linear``) and transformers' ``Conv1D`` (its weight
    transposed) become plain ``nn.Linear``, so the folding passes see one kind of linear layer.
    """
    work = copy.deepcopy(model)
    for name, m in list(work.named_modules()):
        mask = getattr(m, "weight_mask", None)
        if isinstance(mask, torch.Tensor) and isinstance(getattr(m, "weight", None), torch.Tensor):
            with torch.no_grad():
                m.weight.mul_(mask.to(m.weight.dtype))
        conv1d = _is_conv1d(m)
        if name and (conv1d or (isinstance(m, nn.Linear) and type(m) is not nn.Linear)):
            w = m.weight.detach().t() if conv1d else m.weight.detach()
            bias = getattr(m, "bias", None)
            plain = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                plain.weight.copy_(w)
                if bias is not None:
                    plain.bias.copy_(bias)
            plain.weight.requires_grad_(m.weight.requires_grad)
            parent, _, attr = name.rpartition(".")
            setattr(work.get_submodule(parent) if parent else work, attr, plain)
    strip_masks(work)
    work.eval()
    return work
