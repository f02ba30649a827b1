"""Pruning methods as plug-ins: the registry that ``method=`` names look up, and the built-in methods.

A method implements :class:`PruningMethod` (:mod:`egp_fast.pruning.methods.base`);
:func:`register_method` makes a factory for it a ``method=`` of :func:`egp_fast.prune`,
:class:`egp_fast.Pruner` and the loop around them, which never ask which method they run.
Registered here: ``"egp"`` (:class:`EGPMethod`), ``"imp"`` (:class:`IMPMethod`) and
``"easier"`` (:class:`EasierMethod`).
"""

from __future__ import annotations

from collections.abc import Callable

from egp_fast.errors import ConfigError
from egp_fast.pruning.methods.base import MethodContext, PlanRule, PruningMethod, WeightMethod, check_method
from egp_fast.pruning.methods.easier import EasierMethod, choose_sites, pick_sites
from egp_fast.pruning.methods.egp import EGPMethod, layer_entropy, layer_magnitudes
from egp_fast.pruning.methods.imp import IMPMethod

__all__ = [
    "EGPMethod",
    "EasierMethod",
    "IMPMethod",
    "MethodContext",
    "PlanRule",
    "PruningMethod",
    "WeightMethod",
    "available_methods",
    "choose_sites",
    "get_method",
    "layer_entropy",
    "layer_magnitudes",
    "pick_sites",
    "register_method",
    "unregister_method",
]

#: name -> factory, in registration order (the order error messages list them in).
_FACTORIES: dict[str, Callable[..., PruningMethod]] = {}


def register_method(name: str, factory: Callable[..., PruningMethod], *, replace: bool = False) -> None:
    """Make ``factory`` the pruning method ``method=name`` of ``prune()`` and ``Pruner``.

    Args:
        name: the ``method=`` string (recorded in each round's :class:`egp_fast.RoundRecord`).
        factory: ``factory(**options) -> PruningMethod``, called once per Pruner with the
            Pruner's method options as keywords (today ``linearization``); accept ``**options``
            and ignore those you do not use. A :class:`PruningMethod` subclass is a factory.
        replace: allow replacing a method already registered under ``name``.

    Raises:
        ConfigError: ``name`` is not a non-empty string, ``factory`` is not callable, or
            ``name`` is taken and ``replace`` is False.

    Example:
        >>> import torch, egp_fast
        >>> from egp_fast.pruning import IMPMethod, register_method, unregister_method
        >>> class Half(IMPMethod):  # IMP that prunes half the step
        ...     name = "half-imp"
        ...     def plan(self, ctx, stats, remaining):
        ...         return {n: k // 2 for n, k in super().plan(ctx, stats, remaining).items()}
        >>> register_method("half-imp", Half)
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> result = egp_fast.prune(net, [torch.randn(16, 4)], method="half-imp", iterations=1, progress=False)
        >>> result.rounds[0].method, round(result.rounds[0].sparsity, 2)
        ('half-imp', 0.25)
        >>> unregister_method("half-imp")
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"register_method: name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise ConfigError(f"register_method({name!r}, ...): factory must be callable, got {type(factory).__name__}")
    if name in _FACTORIES and not replace:
        raise ConfigError(f"register_method: a method {name!r} is already registered; pass replace=True to replace it")
    _FACTORIES[name] = factory


def unregister_method(name: str) -> None:
    """Remove the method registered as ``name`` (a no-op when there is none).

    Example:
        >>> unregister_method("not-registered")
    """
    _FACTORIES.pop(name, None)


def available_methods() -> list[str]:
    """The registered method names, in registration order.

    Example:
        >>> available_methods()[:3]
        ['egp', 'imp', 'easier']
    """
    return list(_FACTORIES)


def get_method(name: str, **options: object) -> PruningMethod:
    """A new instance of the method registered as ``name``, built with ``options``.

    Args:
        name: a registered method name (see :func:`available_methods`).
        **options: passed to the factory (``linearization`` for ``"easier"``).

    Returns:
        The :class:`PruningMethod`.

    Raises:
        ConfigError: no method is registered as ``name`` (the message lists those that are),
            an option is invalid, or the factory returned something else.

    Example:
        >>> get_method("easier", linearization="majority").linearization
        'majority'
    """
    factory = _FACTORIES.get(name) if isinstance(name, str) else None
    if factory is None:
        known = " or ".join(repr(n) for n in _FACTORIES)
        raise ConfigError(
            f"method={name!r} is not a pruning method; use {known} (the registered methods; "
            "egp_fast.pruning.register_method adds one)"
        )
    method = check_method(factory(**options))
    if not method.name:
        method.name = name
    return method


register_method("egp", EGPMethod)
register_method("imp", IMPMethod)
register_method("easier", EasierMethod)
