"""The per-layer mask guard: pruned gradients zeroed as autograd writes them, through copies.

* **Gradients.** A post-accumulate-grad hook on the weight zeroes the pruned entries of
  ``weight.grad`` in place, right after autograd writes it (the gradient is still in cache),
  with an inverted bool mask cached per layer and rebuilt only when the mask changes. Not a
  product: a NaN/Inf gradient must not leak (NaN * 0 = NaN). On the CPU the extension's
  ``zero_pruned_`` clears the pruned entries' bits in one vectorised pass over the gradient and
  the 1-byte mask, much faster than ATen's boolean ``masked_fill_``, which is not vectorised
  there; without the extension, an int bit mask cached per layer (4 bytes per weight) is ANDed
  into the gradient's bits; on GPUs ``masked_fill_``. Every way gives an exact +0.0. The hook
  runs before distributed data parallel reads the gradient.
* **Copies.** A small guard object lives in the layer's ``__dict__``; deep copies and unpickled
  models carry it, and it installs the gradient hook on the copy's weight as it is rebuilt.

Each guard registers its weight with the optimizer step hooks (:mod:`egp_fast.masks.optim`);
:func:`rebind` and :func:`release` bring that registry in line with the model.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn as nn

from egp_fast.errors import ModelError
from egp_fast.masks.optim import _REGISTRY, _install_optimizer_hooks

MASK = "weight_mask"
_GUARD = "_egp_mask_guard"

# Integer dtypes of each float width, for the bit-mask zeroing on the CPU without the extension.
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _cpu_zero_kernel():
    """The extension's CPU ``zero_pruned_`` op, or None (no extension, or a build without it)."""
    try:
        from egp_fast import _ext

        return torch.ops.egp_fast.zero_pruned_.default if _ext.HAS_CPP else None
    except (ImportError, AttributeError, RuntimeError):
        return None


_ZERO_PRUNED = _cpu_zero_kernel()


class _Guard:
    """Mask enforcement of one layer's weight: the gradient hook and the cached inverted mask.

    Stored in the layer's ``__dict__`` so it is deep-copied and pickled with the layer; holds
    weak references only (the layer owns it, the weight's hook owns it).
    """

    def __init__(self, module: nn.Module, weight: torch.Tensor) -> None:
        self._module = weakref.ref(module)
        self._weight = weakref.ref(weight)
        self._handle = None
        self._mask_obj: torch.Tensor | None = None
        self._mask_ver = -1
        self._pruned: torch.Tensor | None = None
        self._bits: dict[int, torch.Tensor] = {}
        self._any = False
        self.token = 0  # bumped whenever the mask changes
        self._install()

    # -- copies ----------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        return {"module": self._module(), "weight": self._weight()}

    def __setstate__(self, state: dict) -> None:
        # Called while the layer itself is being rebuilt (its __dict__ may still be empty), but
        # the weight Parameter is complete: deepcopy and pickle build it before this point.
        module, weight = state.get("module"), state.get("weight")
        self._module = weakref.ref(module) if module is not None else (lambda: None)
        self._weight = weakref.ref(weight) if weight is not None else (lambda: None)
        self._handle = None
        self._mask_obj, self._mask_ver, self._pruned, self._any, self.token = None, -1, None, False, 0
        self._bits = {}
        self._install()

    def _install(self) -> None:
        w = self._weight()
        if w is None:
            return
        old = _REGISTRY.get(w)
        if old is not None and old is not self:
            old.remove_hook()
        if isinstance(w, torch.Tensor) and w.requires_grad and w.is_leaf:
            self._handle = w.register_post_accumulate_grad_hook(self._on_grad)
        _REGISTRY[w] = self
        _install_optimizer_hooks()

    def remove_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def has_hook(self) -> bool:
        return self._handle is not None

    # -- masks -----------------------------------------------------------------------------
    def pruned(self, p: torch.Tensor) -> torch.Tensor | None:
        """The inverted mask (True = pruned) if ``p`` is still this layer's masked weight and
        something is pruned, else None. Rebuilt only when the mask object or its version changes."""
        module = self._module()
        if module is None or getattr(module, "weight", None) is not p:
            return None
        mask = module._buffers.get(MASK)
        if mask is None:
            return None
        if mask is not self._mask_obj or mask._version != self._mask_ver:
            self._pruned = torch.logical_not(mask)
            self._bits = {}
            self._any = bool(self._pruned.any())
            self._mask_obj, self._mask_ver = mask, mask._version
            self.token += 1
        return self._pruned if self._any else None

    def forget(self) -> None:
        """Drop the cached inverted mask (1 byte per weight); the next use rebuilds it."""
        self._pruned, self._bits, self._mask_obj, self._mask_ver = None, {}, None, -1

    def zero_(self, t: torch.Tensor, pruned: torch.Tensor) -> None:
        """Set the pruned entries of ``t`` (a dense tensor of the weight's shape) to +0.0."""
        if t.layout != torch.strided:
            raise ModelError("masks: only dense (strided) tensors can be masked in place")
        cpu = t.device.type == "cpu" and t.is_floating_point() and t.device == pruned.device
        if cpu and _ZERO_PRUNED is not None and t.is_contiguous() and pruned.is_contiguous():
            _ZERO_PRUNED(t, pruned)  # one pass over t and the 1-byte mask
            return
        ints = _BITS.get(t.element_size()) if cpu else None
        if ints is None:
            t.masked_fill_(pruned.to(t.device), 0)
            return
        bits = self._bits.get(t.element_size())
        if bits is None:
            # -1 (every bit set) where kept, 0 where pruned
            bits = self._bits[t.element_size()] = torch.logical_not(pruned).to(ints).neg_()
        t.view(ints).bitwise_and_(bits)

    def _on_grad(self, p: torch.Tensor) -> None:
        g = p.grad
        if g is None or g.layout != torch.strided:
            return  # sparse gradients: the step hooks re-zero weight and state instead
        pruned = self.pruned(p)
        if pruned is not None:
            self.zero_(g, pruned)


def _guard_of(module: nn.Module) -> _Guard | None:
    g = module.__dict__.get(_GUARD)
    return g if isinstance(g, _Guard) else None


def _ensure_grad_hook(module: nn.Module) -> None:
    w = module.weight
    g = _guard_of(module)
    if g is not None and g._weight() is w and _REGISTRY.get(w) is g:
        return
    if g is not None:
        g.remove_hook()
    object.__setattr__(module, _GUARD, _Guard(module, w))


def _drop_guard(module: nn.Module) -> None:
    g = module.__dict__.pop(_GUARD, None)
    if isinstance(g, _Guard):
        g.remove_hook()
        w = g._weight()
        if w is not None and _REGISTRY.get(w) is g:
            del _REGISTRY[w]


class _MaskEnforcer:
    """Forward pre-hook of earlier versions, kept so models pickled by them still load: it
    installs the current enforcement on first use (skipped while torch.compile traces)."""

    def __call__(self, module: nn.Module, args: Any) -> None:
        if not torch.compiler.is_compiling() and getattr(module, MASK, None) is not None:
            _ensure_grad_hook(module)


def rebind(module: nn.Module) -> None:
    """Point the weight's mask enforcement at ``module``.

    Call after swapping ``module`` in for another module that shares the same weight Parameter
    (e.g. :meth:`egp_fast.masks.MaskedLinear.from_linear`).

    Args:
        module: the layer now owning the weight and its ``weight_mask``.

    Example:
        >>> import torch, egp_fast
        >>> from egp_fast.masks.linear import MaskedLinear
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3)); egp_fast.attach_masks(net, ["0"])
        >>> net[0] = MaskedLinear.from_linear(net[0]); rebind(net[0])
    """
    old = _REGISTRY.get(module.weight)
    if old is not None and old._module() is not module:
        old.remove_hook()
        del _REGISTRY[module.weight]
    _ensure_grad_hook(module)


def release(model: nn.Module) -> None:
    """Bring mask enforcement in line with the masks present in ``model``.

    Layers without a ``weight_mask`` lose their gradient hook; layers with one get it (after a
    model's buffers were restored from a snapshot, say).

    Args:
        model: the network.

    Example:
        >>> import torch, egp_fast
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3)); egp_fast.attach_masks(net, ["0"])
        >>> del net[0]._buffers["weight_mask"]; release(net); net[0].weight in _REGISTRY
        False
    """
    for m in model.modules():
        w = m._parameters.get("weight") if hasattr(m, "_parameters") else None
        has_mask = isinstance(m._buffers.get(MASK), torch.Tensor)
        if has_mask and isinstance(w, torch.Tensor):
            _ensure_grad_hook(m)
        elif _guard_of(m) is not None:
            _drop_guard(m)
        elif isinstance(w, torch.Tensor) and w in _REGISTRY and _REGISTRY[w]._module() is m:
            _REGISTRY.pop(w).remove_hook()
