"""Optimizer step hooks that keep pruned weights and their optimizer state at exactly zero.

With pruned weights, gradients and state at zero, the elementwise ``torch.optim`` optimizers
(SGD with momentum and weight decay, Adam, AdamW, ...) keep them at zero by themselves. So a
global optimizer step *pre*-hook zeroes the pruned entries of the weight, its gradient and every
weight-shaped state tensor (momentum, Adam moments) only when something may have revived them:
the mask changed (a new pruning round), the optimizer's state tensors were replaced
(``load_state_dict``) or :func:`egp_fast.masks.enforce` was called (:func:`_new_epoch`). Any
other optimizer class (LBFGS, user subclasses) gets that full re-zeroing after every step.

Also home of the registry of masked weights the hooks walk: each weight Parameter maps to the
guard (:mod:`egp_fast.masks.guard`) that knows its mask and how to zero its pruned entries.
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol

import torch
from torch.utils.weak import WeakIdKeyDictionary


class _WeightGuard(Protocol):
    """What the step hooks need of a weight's guard (:class:`egp_fast.masks.guard._Guard`)."""

    token: int  # bumped whenever the mask changes

    @property
    def has_hook(self) -> bool: ...

    def pruned(self, p: torch.Tensor) -> torch.Tensor | None: ...

    def zero_(self, t: torch.Tensor, pruned: torch.Tensor) -> None: ...


# weight Parameter -> its guard. Weak on the key side; the guard holds only weak references,
# so dropping a model drops its entries.
_REGISTRY: WeakIdKeyDictionary = WeakIdKeyDictionary()
_optimizer_hooks: tuple | None = None
# Bumped by enforce(): every optimizer re-zeroes the pruned entries of its state once.
_EPOCH = 0
# optimizer -> {weight: signature of the last re-zeroing}
_CLEAN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# Optimizers whose update of an entry depends only on that entry's weight, gradient and state,
# and is zero when all three are zero: with pruned gradients zeroed, they need no re-zeroing
# after each step. Exact classes only: a subclass may change step().
_ELEMENTWISE = frozenset(
    getattr(torch.optim, n)
    for n in ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "Rprop", "ASGD")
    if hasattr(torch.optim, n)
)


def _new_epoch() -> None:
    """Make every optimizer re-zero the pruned entries of its weights and state at its next step."""
    global _EPOCH
    _EPOCH += 1


def _state_tensors(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> list[torch.Tensor]:
    state = optimizer.state.get(p)
    if not state:
        return []
    return [v for v in state.values() if isinstance(v, torch.Tensor) and v.shape == p.shape and v.is_floating_point()]


def _rezero(p: torch.Tensor, guard: _WeightGuard, pruned: torch.Tensor, states: list[torch.Tensor]) -> None:
    guard.zero_(p, pruned)
    if p.grad is not None:
        _rezero_grad(p, guard, pruned)
    for v in states:
        guard.zero_(v, pruned)


def _masked_params(optimizer: torch.optim.Optimizer):
    for group in optimizer.param_groups:
        for p in group["params"]:
            g = _REGISTRY.get(p)
            if g is None:
                continue
            pruned = g.pruned(p)
            if pruned is not None:
                yield p, g, pruned


def _before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Zero pruned weights, gradients and state of ``optimizer`` where they may have revived."""
    try:
        clean = _CLEAN.setdefault(optimizer, WeakIdKeyDictionary())
    except TypeError:  # an optimizer that cannot be weakly referenced: re-zero every time
        clean = None
    with torch.no_grad():
        for p, g, pruned in _masked_params(optimizer):
            states = _state_tensors(optimizer, p)
            sig = (_EPOCH, g.token, tuple(id(v) for v in states))
            if clean is None or clean.get(p) != sig:
                _rezero(p, g, pruned, states)
                if clean is not None:
                    clean[p] = sig
            elif not g.has_hook and p.grad is not None:
                _rezero_grad(p, g, pruned)


def _rezero_grad(p: torch.Tensor, guard: _WeightGuard, pruned: torch.Tensor) -> None:
    if p.grad.layout == torch.strided:
        guard.zero_(p.grad, pruned)
    else:
        p.grad = p.grad.to_dense().masked_fill_(pruned, 0)


def _after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Record the (clean) state tensors an elementwise step created; re-zero for other optimizers."""
    elementwise = type(optimizer) in _ELEMENTWISE
    clean = _CLEAN.get(optimizer)
    with torch.no_grad():
        for p, g, pruned in _masked_params(optimizer):
            states = _state_tensors(optimizer, p)
            if not elementwise or not g.has_hook or p.grad is None or p.grad.layout != torch.strided:
                g.zero_(p, pruned)
                for v in states:
                    g.zero_(v, pruned)
            if clean is not None:
                clean[p] = (_EPOCH, g.token, tuple(id(v) for v in states))


def _install_optimizer_hooks() -> None:
    """Register the global step hooks, once (the first time a layer gets a guard)."""
    global _optimizer_hooks
    if _optimizer_hooks is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        # Looked up at call time, so the module's functions can be swapped (tests do).
        _optimizer_hooks = (
            register_optimizer_step_pre_hook(lambda o, a, k: _before_step(o, a, k)),
            register_optimizer_step_post_hook(lambda o, a, k: _after_step(o, a, k)),
        )
