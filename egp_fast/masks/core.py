"""Pruning masks: storage, enforcement through training, and state_dict round-trips.

Every pruned layer carries a bool buffer ``weight_mask`` (``True`` = kept, the polarity of
``torch.nn.utils.prune``), so masks travel with ``state_dict()`` under keys such as
``layer1.0.conv1.weight_mask``, deep-copy and pickle with the model. This module is the
masks' API: attach, set, enforce, load, strip and measure them.

How pruned weights stay exactly zero through training, at almost no cost per step: a hook on
each masked weight zeroes the pruned entries of its gradient as autograd writes it, and travels
with copies of the model (:mod:`egp_fast.masks.guard`); optimizer step hooks zero the pruned
entries of the weights and their optimizer state only when something may have revived them
(:mod:`egp_fast.masks.optim`).

No forward hook is involved, so ``torch.compile`` traces a masked model exactly as the plain
one (no graph breaks). What is not covered: writing to a masked weight by hand (assigning
``.data``, ``copy_``, loading a dense ``state_dict`` without masks) or to its gradient after
``backward()``. Call :func:`enforce` after such writes.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

from egp_fast.errors import CheckpointError, ConfigError, ModelError
from egp_fast.masks.guard import MASK, _drop_guard, _ensure_grad_hook, _guard_of, _MaskEnforcer, release
from egp_fast.masks.optim import _new_epoch


def _resolve(model: nn.Module, name: str) -> nn.Module:
    try:
        m = model.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"the model has no layer named {name!r}") from None
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise ModelError(f"layer {name!r} ({type(m).__name__}) has no floating-point weight to prune")
    return m


def attach_masks(model: nn.Module, layer_names: Iterable[str]) -> None:
    """Give each named layer an all-``True`` ``weight_mask`` buffer and mask enforcement.

    Idempotent: layers that already have a mask keep it.

    Args:
        model: the network.
        layer_names: ``model.named_modules()`` names of layers with a ``weight``.

    Example:
        >>> import torch, egp_fast
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3))
        >>> egp_fast.attach_masks(net, ["0"]); net[0].weight_mask.all().item()
        True
    """
    for name in layer_names:
        m = _resolve(model, name)
        if getattr(m, MASK, None) is None:
            mask = torch.ones_like(m.weight, dtype=torch.bool)
            m.register_buffer(MASK, mask)
        _ensure_grad_hook(m)


def masked_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of every layer that carries a pruning mask."""
    return {n: m for n, m in model.named_modules() if isinstance(getattr(m, MASK, None), torch.Tensor)}


class PackedMask:
    """A bool mask held at one bit per entry, which :func:`set_masks` takes like the mask itself.

    For a caller that computes the new masks of many layers before writing any (so that a
    failure changes nothing): packed, they cost an eighth of the bool masks.

    Example:
        >>> import torch
        >>> m = torch.tensor([[True, False, True], [False, False, True]])
        >>> p = PackedMask(m); p.shape, torch.equal(p.unpack(), m)
        ((2, 3), True)
    """

    __slots__ = ("bits", "shape")

    def __init__(self, mask: torch.Tensor, out: torch.Tensor | None = None) -> None:
        """Pack ``mask``.

        Args:
            mask: the bool mask (any shape and strides; read in row-major order).
            out: optional uint8 tensor of ``(mask.numel() + 7) // 8`` entries on the mask's
                device to hold the bits (a slice of one buffer for many masks keeps them out of
                the way of the allocator's short-lived blocks); a new one when ``None``.
        """
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ConfigError("PackedMask needs a bool tensor")
        self.shape = tuple(mask.shape)
        flat = mask.reshape(-1).view(torch.uint8)
        n = flat.numel()
        place = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flat.device)
        if out is None:
            out = torch.empty((n + 7) // 8, dtype=torch.uint8, device=flat.device)
        elif out.dtype != torch.uint8 or out.shape != ((n + 7) // 8,) or out.device != flat.device:
            raise ConfigError(
                f"PackedMask(out=...) must be a uint8 tensor of shape ({(n + 7) // 8},) on {flat.device}, got "
                f"{out.dtype} {tuple(out.shape)} on {out.device}"
            )
        self.bits = out
        # A slice at a time: the scratch is a slice's bytes, not the whole mask again.
        full = n - n % 8
        for lo in range(0, full, _SLICE):
            hi = min(lo + _SLICE, full)
            torch.sum(flat[lo:hi].view(-1, 8).mul(place), 1, dtype=torch.uint8, out=self.bits[lo // 8 : hi // 8])
        if full < n:
            tail = torch.cat([flat[full:], flat.new_zeros(8 - (n - full))])
            self.bits[-1] = tail.mul(place).sum(dtype=torch.uint8)

    @property
    def device(self) -> torch.device:
        return self.bits.device

    def unpack(self) -> torch.Tensor:
        """The bool mask (contiguous, on the device of the packed bits)."""
        out = torch.empty(self.shape, dtype=torch.bool, device=self.bits.device)
        self.unpack_into(out)
        return out

    def unpack_into(self, out: torch.Tensor) -> None:
        """Write the bool mask into ``out`` (contiguous, of :attr:`shape`), a slice at a time."""
        if tuple(out.shape) != self.shape or out.dtype != torch.bool or not out.is_contiguous():
            raise ConfigError(f"PackedMask.unpack_into needs a contiguous bool tensor of shape {self.shape}")
        flat = out.view(-1).view(torch.uint8)
        n = flat.numel()
        shifts = torch.arange(8, dtype=torch.uint8, device=self.bits.device)
        full = n - n % 8
        for lo in range(0, full, _SLICE):
            hi = min(lo + _SLICE, full)
            # In place in the output: each byte of bits copied 8 times, then bit j of copy j.
            # (A broadcasting shift of bits[:, None] by shifts is several times slower on the CPU.)
            part = flat[lo:hi].view(-1, 8)
            part.copy_(self.bits[lo // 8 : hi // 8].unsqueeze(1).expand(-1, 8))
            part.bitwise_right_shift_(shifts).bitwise_and_(1)
        if full < n:
            last = self.bits[-1:].expand(8).bitwise_right_shift(shifts).bitwise_and_(1)
            flat[full:].copy_(last[: n - full])


#: Entries a :class:`PackedMask` packs or unpacks at a time (a multiple of 8).
_SLICE = 1 << 20


def set_masks(model: nn.Module, masks: Mapping[str, torch.Tensor], *, take: bool = False) -> None:
    """Replace the masks of the named layers (bool tensors, ``True`` = kept) and zero the weights.

    A mask may also be given as a :class:`PackedMask` (1 bit per entry).

    All or nothing, without an undo copy of the weights: every mask is checked, and the layers
    that have no mask yet get one, before any weight or existing mask changes; the writes that
    follow (each mask copied in place, then the pruned weights zeroed) cannot fail on a valid
    layer, and a ``KeyboardInterrupt`` (SIGINT) arriving while they run is held until the last
    layer is written, then raised. A failure before the writes (an invalid mask, an interrupt
    or an error while masks are attached) changes nothing. Should the writes fail anyway (out
    of memory), every layer is left consistent: those written keep their new mask with their
    pruned weights zero, the others are unchanged.

    The peak extra memory is one layer's inverted mask (1 byte per weight of the largest
    layer) on top of the caller's ``masks``; the inverted masks that mask enforcement caches
    for the backward pass are dropped and rebuilt at the first backward.

    Args:
        model: the network.
        masks: layer name -> bool mask of its weight's shape (``True`` = kept), or its
            :class:`PackedMask`.
        take: ``masks`` is a ``dict`` the caller hands over: each entry is removed from it
            once written, so a caller that holds no other reference frees the new masks layer
            by layer (:meth:`egp_fast.pruning.WeightMethod.apply` does).
    """
    if take and not isinstance(masks, dict):
        raise ConfigError(f"set_masks(take=True) needs a dict of masks, got {type(masks).__name__}")
    todo = []
    for name, mask in masks.items():
        m = _resolve(model, name)
        shape = tuple(m.weight.shape)
        if isinstance(mask, PackedMask) and mask.shape == shape:
            pass
        elif not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != shape:
            got = (
                f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor)
                else f"PackedMask {mask.shape}" if isinstance(mask, PackedMask) else type(mask).__name__
            )
            raise ConfigError(f"mask for {name!r} must be bool with shape {shape}, got {got}")
        if m.weight.layout != torch.strided:
            raise ModelError(
                f"masks: layer {name!r} has a {m.weight.layout} weight; only dense (strided) "
                "weights can be masked"
            )
        todo.append((name, m))
    mask = None  # no reference of ours outlives its write (take=True)
    attached: list[nn.Module] = []
    try:
        for name, m in todo:
            if getattr(m, MASK, None) is None:
                attach_masks(model, [name])
                attached.append(m)
    except BaseException:
        for m in reversed(attached):
            m._buffers.pop(MASK, None)
            _drop_guard(m)
        raise
    done = 0
    try:
        with _interrupts_held(), torch.no_grad():
            for name, m in todo:
                _write_mask(m, masks.pop(name) if take else masks[name])
                done += 1
    except BaseException:
        # Out of memory or a bug mid-way: leave each layer consistent (see the docstring).
        with torch.no_grad():
            for _, m in todo[: done + 1]:
                m.weight.masked_fill_(~getattr(m, MASK).to(m.weight.device), 0)
        raise


def _write_mask(m: nn.Module, mask: torch.Tensor | PackedMask) -> None:
    """Copy ``mask`` into the layer's mask buffer in place and zero the weights it prunes."""
    cur = getattr(m, MASK)
    if isinstance(mask, PackedMask) and cur.is_contiguous() and cur.device == mask.device:
        mask.unpack_into(cur)  # no whole-layer temporary
    else:
        cur.copy_(mask.unpack() if isinstance(mask, PackedMask) else mask)
    guard = _guard_of(m)
    if guard is None:
        m.weight.masked_fill_(~cur.to(m.weight.device), 0)
    else:
        # The guard's inverted mask: on the CPU its zeroing is faster than a boolean
        # masked_fill_. Dropped after use (1 byte per weight; the first backward rebuilds it).
        if (cached := guard.pruned(m.weight)) is not None:
            guard.zero_(m.weight, cached)
        del cached
        guard.forget()


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold SIGINT (Ctrl-C) for the duration, then deliver it as the old handler would.

    A no-op outside the main thread (where Python cannot install handlers).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[tuple[int, Any]] = []
    try:
        old = signal.signal(signal.SIGINT, lambda sig, frame: got.append((sig, frame)))
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if got:
            if callable(old):
                old(*got[0])
            elif old == signal.SIG_DFL:
                raise KeyboardInterrupt

def enforce(model: nn.Module) -> None:
    """Zero every pruned weight now, and the optimizer state of pruned entries at the next step.

    Needed only after writing to masked weights (or their gradients) by hand: assigning
    ``.data``, ``copy_``, ``load_state_dict`` of a dense checkpoint. Training with any
    ``torch.optim`` optimizer keeps pruned weights at zero without it.

    Args:
        model: the network.

    Example:
        >>> import torch, egp_fast
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2)); egp_fast.attach_masks(net, ["0"])
        >>> net[0].weight_mask[0, 0] = False
        >>> with torch.no_grad(): _ = net[0].weight.fill_(1.0)
        >>> enforce(net); net[0].weight[0, 0].item()
        0.0
    """
    _new_epoch()
    with torch.no_grad():
        for m in masked_layers(model).values():
            m.weight.masked_fill_(~getattr(m, MASK), 0)
            _ensure_grad_hook(m)


def load_pruned_state_dict(model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True) -> Any:
    """Load a pruned model's ``state_dict`` into a fresh (unpruned) model of the same class.

    Creates the masks named in ``state_dict`` (keys ending in ``.weight_mask``), then loads
    weights and masks, and zeroes the pruned weights.

    Args:
        model: a model of the same architecture, with or without masks.
        state_dict: from ``pruned_model.state_dict()`` (or a checkpoint).
        strict: as in ``nn.Module.load_state_dict``.

    Returns:
        ``load_state_dict``'s result (missing and unexpected keys).

    Example:
        >>> import torch, egp_fast
        >>> pruned = torch.nn.Sequential(torch.nn.Linear(4, 2)); egp_fast.attach_masks(pruned, ["0"])
        >>> set_masks(pruned, {"0": pruned[0].weight.abs() > pruned[0].weight.abs().median()})
        >>> fresh = torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> _ = egp_fast.load_pruned_state_dict(fresh, pruned.state_dict())
        >>> torch.equal(fresh[0].weight_mask, pruned[0].weight_mask), torch.equal(fresh[0].weight, pruned[0].weight)
        (True, True)
    """
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    suffix = "." + MASK
    names = [k[: -len(suffix)] for k in state_dict if k.endswith(suffix)]
    if MASK in state_dict:
        names.append("")
    _check_state_dict(model, state_dict, names, strict)
    attach_masks(model, names)
    result = model.load_state_dict(state_dict, strict=strict)
    enforce(model)
    return result


def _check_state_dict(model: nn.Module, state_dict: Mapping[str, Any], names: list[str], strict: bool) -> None:
    # Checked before anything changes: torch's load_state_dict copies every tensor that fits
    # before it reports the ones that do not, which would leave a half-loaded model.
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    for n in names:
        key = f"{n}.{MASK}" if n else MASK
        w = getattr(modules.get(n), "weight", None)
        if key not in expected:
            if not isinstance(w, torch.Tensor):
                raise CheckpointError(
                    f"the state_dict has a mask {key!r} but the model has no layer {n!r} with a "
                    "weight; load it into a model of the architecture it was saved from"
                )
            expected[key] = tuple(w.shape)
    problems = [
        f"{k}: {tuple(v.shape)} in the state_dict but {expected[k]} in the model"
        for k, v in state_dict.items()
        if k in expected and isinstance(v, torch.Tensor) and tuple(v.shape) != expected[k]
    ]
    if strict:
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if missing:
            problems.append(f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    if problems:
        raise CheckpointError(
            "the state_dict does not fit the model (saved from another architecture or width?); "
            "nothing was loaded: " + "; ".join(problems[:5])
        )


def strip_masks(model: nn.Module) -> nn.Module:
    """Remove masks and their hooks; pruned weights stay zero. Returns ``model``."""
    for m in masked_layers(model).values():
        for k, h in list(m._forward_pre_hooks.items()):
            if isinstance(h, _MaskEnforcer):  # a model pickled by an earlier version
                del m._forward_pre_hooks[k]
        del m._buffers[MASK]
        _drop_guard(m)
    release(model)
    return model


def sparsity(model: nn.Module, layer_names: Iterable[str] | None = None) -> float:
    """Fraction of zero weights over the given layers (default: every masked layer)."""
    names = list(layer_names) if layer_names is not None else list(masked_layers(model))
    total = zeros = 0
    for n in names:
        w = _resolve(model, n).weight
        total += w.numel()
        zeros += int((w == 0).sum())
    return zeros / total if total else 0.0
