"""Which modules are activations: torch.nn classes, a registry, and probing by behaviour.

EGP measures activation *sites* (docs/algorithm.md, "Terms"). A site module is recognised, in this order:

1. ``torch.nn`` activation classes (``nn.ReLU``, ``nn.GELU``, ``nn.SiLU``...), by ``isinstance``;
2. classes registered with :func:`register_activation` (an explicit registration always wins
   over probing, and can mark a class as *not* an activation with ``kind=None``);
3. probing: a module with no children and no parameters whose ``forward`` takes one tensor is
   run (hooks bypassed, no grad) on a fixed probe tensor, and its output is compared with ReLU,
   LeakyReLU (any slope other than 0 and 1), ReLU6/Hardtanh (clip values visible in the
   probe), GELU (erf and tanh forms), SiLU and QuickGELU (``x * sigmoid(1.702 x)``, a GELU
   approximation: kind ``"gelu"``). It must match within ``_ATOL + _RTOL * |f(x)|`` at every
   probe point, so identity, dropout, Softmax, LayerNorm, Tanh, Sigmoid, ELU, Mish, clipped
   GELUs and the like are not taken for activations. This recognises the ``transformers``
   library's own classes (``GELUActivation``, ``NewGELUActivation``, ``QuickGELUActivation``,
   ``SiLUActivation``...) and user-defined ones without matching class names.

The probe costs a few hundred microseconds; its result is cached per class and per the
instance's plain attributes (numbers, strings, functions), so each distinct configuration of
a class is probed once per process.
"""

from __future__ import annotations

import math
import threading
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from egp_fast.errors import ConfigError

__all__ = ["ACTIVATION_KINDS", "activation_info", "register_activation", "registered_activations"]

#: Every kind of site EGP can measure (see :class:`egp_fast.graph.Site`).
ACTIVATION_KINDS: tuple[str, ...] = ("relu", "relu6", "hardtanh", "leaky_relu", "prelu", "gelu", "silu")

_ATOL = 2e-5
_RTOL = 2e-5

_lock = threading.Lock()
# class -> (kind or None, params or None); params None: read from the instance or probe.
_REGISTRY: dict[type, tuple[str | None, dict[str, Any] | None]] = {}
# (class, attribute key) -> (kind, params) or None
_PROBE_CACHE: dict[tuple, tuple[str, dict[str, Any]] | None] = {}

# Classes that are never activations, however they behave on the probe (cheap early exit, and
# a guard: dropout with p=0 is the identity, which no candidate matches anyway).
_NEVER: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.modules.dropout._DropoutNd,
    nn.Softmax,
    nn.LogSoftmax,
    nn.Softmin,
    nn.Tanh,
    nn.Sigmoid,
    nn.Flatten,
    nn.Unflatten,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Upsample,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Mish,
    nn.Softplus,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Tanhshrink,
    nn.Softsign,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Threshold,
    nn.LogSigmoid,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def register_activation(cls: type, kind: str | None, params: dict[str, Any] | None = None) -> None:
    """Declare that instances of ``cls`` are activation sites of ``kind`` (or are not, with None).

    Registration wins over probing (see the module docstring): use it for an activation the
    probe does not recognise, to fix the kind of one it mistakes, or with ``kind=None`` to stop
    a class from being treated as an activation at all. Subclasses inherit a registration.

    Args:
        cls: the activation module class (a subclass of ``torch.nn.Module``).
        kind: one of :data:`ACTIVATION_KINDS` (``"relu"``, ``"relu6"``, ``"hardtanh"``,
            ``"leaky_relu"``, ``"prelu"``, ``"gelu"``, ``"silu"``), or ``None``.
            ``"gelu"``/``"silu"`` mean a smooth site whose linearisation is approximate.
        params: the activation's parameters when ``kind`` needs them (``negative_slope`` for
            ``leaky_relu``; ``min_val``/``max_val`` for ``hardtanh``/``relu6``). Default: the
            instance's attributes of those names, else what probing the instance finds, else
            the ``torch.nn`` defaults.

    Raises:
        ConfigError: ``cls`` is not an ``nn.Module`` class, ``kind`` is not a supported kind,
            or ``params`` is not a dict of numbers/strings.

    Example:
        >>> import torch, egp_fast
        >>> class Rect(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x.clamp_min(0)
        >>> egp_fast.register_activation(Rect, "relu")
        >>> egp_fast.activations.activation_info(Rect())
        ('relu', {})
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(
            f"register_activation: cls must be an nn.Module subclass, got {cls!r}; pass the class "
            "itself (MyAct), not an instance (MyAct())"
        )
    if kind is not None and kind not in ACTIVATION_KINDS:
        raise ConfigError(
            f"register_activation: kind={kind!r} is not supported; use one of {', '.join(ACTIVATION_KINDS)} "
            "(or None to mark the class as not an activation)"
        )
    if params is not None:
        if not isinstance(params, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float, str, bool)) for k, v in params.items()
        ):
            raise ConfigError(
                f"register_activation: params must be a dict of str -> number/str, got {params!r}"
            )
        params = dict(params)
    with _lock:
        _REGISTRY[cls] = (kind, params)
        _PROBE_CACHE.clear()


def registered_activations() -> dict[type, str | None]:
    """The classes registered with :func:`register_activation` and their kinds.

    Example:
        >>> import egp_fast
        >>> isinstance(egp_fast.activations.registered_activations(), dict)
        True
    """
    with _lock:
        return {c: k for c, (k, _) in _REGISTRY.items()}


def activation_info(m: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """``(kind, params)`` if ``m`` is an activation module, else ``None``.

    Args:
        m: any module.

    Returns:
        The site kind (one of :data:`ACTIVATION_KINDS`) and its JSON-safe parameters
        (``negative_slope``, ``min_val``/``max_val``, ``approximate``), or ``None``.

    Example:
        >>> import torch
        >>> activation_info(torch.nn.LeakyReLU(0.2))
        ('leaky_relu', {'negative_slope': 0.2})
        >>> activation_info(torch.nn.Tanh()) is None
        True
    """
    builtin = _builtin(m)
    if builtin is not None:
        return builtin
    reg = _registered(type(m))
    if reg is not None:
        kind, params = reg
        if kind is None:
            return None
        return kind, _registered_params(m, kind, params)
    return _probed(m)


# --------------------------------------------------------------------------------------------
# torch.nn classes.


def _builtin(m: nn.Module) -> tuple[str, dict[str, Any]] | None:
    # ReLU6 derives from Hardtanh: test it first.
    if isinstance(m, nn.ReLU6):
        return "relu6", {"min_val": float(m.min_val), "max_val": float(m.max_val)}
    if isinstance(m, nn.ReLU):
        return "relu", {}
    if isinstance(m, nn.Hardtanh):
        return "hardtanh", {"min_val": float(m.min_val), "max_val": float(m.max_val)}
    if isinstance(m, nn.LeakyReLU):
        return "leaky_relu", {"negative_slope": float(m.negative_slope)}
    if isinstance(m, nn.PReLU):
        return "prelu", {}
    if isinstance(m, nn.GELU):
        return "gelu", {"approximate": m.approximate}
    if isinstance(m, nn.SiLU):
        return "silu", {}
    return None


# --------------------------------------------------------------------------------------------
# Registry.


def _registered(cls: type) -> tuple[str | None, dict[str, Any] | None] | None:
    if not _REGISTRY:
        return None
    for c in cls.__mro__:
        hit = _REGISTRY.get(c)
        if hit is not None:
            return hit
    return None


_DEFAULTS: dict[str, dict[str, Any]] = {
    "relu6": {"min_val": 0.0, "max_val": 6.0},
    "hardtanh": {"min_val": -1.0, "max_val": 1.0},
    "leaky_relu": {"negative_slope": 0.01},
    "gelu": {"approximate": "none"},
}


def _registered_params(m: nn.Module, kind: str, params: dict[str, Any] | None) -> dict[str, Any]:
    if kind == "prelu":
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor):
            raise ConfigError(
                f"{type(m).__name__} is registered as kind='prelu' but has no 'weight' tensor of "
                "slopes; register it with another kind"
            )
    if params is not None:
        return dict(params)
    want = _DEFAULTS.get(kind)
    if want is None:
        return {}
    out = {}
    for k, default in want.items():
        v = getattr(m, k, None)
        if isinstance(v, (int, float, str)) and not isinstance(v, bool):
            out[k] = float(v) if isinstance(default, float) else v
    if len(out) == len(want):
        return out
    probed = _probe(m)
    if probed is not None and probed[0] == kind:
        return probed[1]
    return {**want, **out}


# --------------------------------------------------------------------------------------------
# Probing.


def _probe_tensor() -> torch.Tensor:
    # Dense around 0 (where the candidates differ most), sparse out to +-20 so clip values and
    # saturations within that range are seen; float32, shape [2, 3, L] so a module that mixes
    # values across positions (softmax, normalisation) cannot look elementwise.
    core = torch.linspace(-4.0, 4.0, 161, dtype=torch.float64)
    tails = torch.tensor([-20.0, -15.0, -12.0, -10.0, -8.0, -7.0, -6.5, -6.0, -5.5, -5.0, -4.5,
                          4.5, 5.0, 5.5, 5.9, 6.0, 6.1, 6.5, 7.0, 8.0, 10.0, 12.0, 15.0, 20.0],
                         dtype=torch.float64)
    x = torch.cat([core, tails])
    x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))]
    n = x.numel()
    reps = torch.stack([x, x.flip(0) * 0.5, x.roll(7) * 1.5])  # three rows, different mixes
    return torch.stack([reps, reps.roll(1, dims=0)]).reshape(2, 3, n)


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_SMOOTH: tuple[tuple[str, dict[str, Any], Any], ...] = (
    ("gelu", {"approximate": "none"}, lambda x: F.gelu(x)),
    ("gelu", {"approximate": "tanh"}, lambda x: F.gelu(x, approximate="tanh")),
    ("silu", {}, F.silu),
    ("gelu", {"approximate": "quick"}, _quick_gelu),
)


def _close(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest error relative to the tolerance: <= 1 means a match."""
    tol = _ATOL + _RTOL * ref.abs()
    return float(((y - ref).abs() / tol).max())


def _fit(x: torch.Tensor, y: torch.Tensor) -> tuple[str, dict[str, Any]] | None:
    """The candidate function ``y`` matches on ``x``, or None."""
    best: tuple[float, str, dict[str, Any]] | None = None

    def consider(kind: str, params: dict[str, Any], ref: torch.Tensor) -> None:
        nonlocal best
        err = _close(y, ref)
        if err <= 1.0 and (best is None or err < best[0]):
            best = (err, kind, params)

    consider("relu", {}, x.clamp_min(0))
    neg = x < -0.5
    slope = float((y[neg] / x[neg]).median())
    if math.isfinite(slope) and abs(slope) > 1e-6 and abs(slope - 1.0) > 1e-3:
        s = round(slope, 6)
        consider("leaky_relu", {"negative_slope": s}, torch.where(x > 0, x, x * s))
    lo, hi = float(y.min()), float(y.max())
    clipped_lo = int((x < lo - 1e-3).sum())
    clipped_hi = int((x > hi + 1e-3).sum())
    # A clip must be visible at both ends (one end alone is ReLU, or a clamp we do not model);
    # the identity has none.
    if clipped_hi >= 2 and clipped_lo >= 2:
        lo_r, hi_r = round(lo, 6), round(hi, 6)
        kind = "relu6" if (lo_r == 0.0 and hi_r == 6.0) else "hardtanh"
        consider(kind, {"min_val": lo_r, "max_val": hi_r}, x.clamp(lo_r, hi_r))
    for kind, params, fn in _SMOOTH:
        consider(kind, dict(params), fn(x))
    return None if best is None else (best[1], best[2])


def _probeable(m: nn.Module) -> bool:
    if isinstance(m, _NEVER) or getattr(m, "_egp_not_activation", False):
        return False
    # children() / parameters(recurse=False), read from the dicts behind them (this runs for
    # every module call a trace sees; the generators cost several microseconds each)
    if any(c is not None for c in m._modules.values()):
        return False
    if any(p is not None for p in m._parameters.values()):
        return False
    return type(m).forward is not nn.Module.forward


def _attr_key(m: nn.Module) -> tuple:
    items = []
    for k, v in sorted(vars(m).items()):
        if k.startswith("_") or k == "training":
            continue
        if isinstance(v, (int, float, str, bool, type(None))):
            items.append((k, v))
        elif callable(v):
            func = getattr(v, "__func__", v)
            if hasattr(func, "func"):  # functools.partial
                items.append((k, (getattr(func.func, "__qualname__", repr(func.func)),
                                  tuple(sorted((a, repr(b)) for a, b in func.keywords.items())))))
            else:
                items.append((k, getattr(func, "__qualname__", type(func).__name__)))
        elif isinstance(v, torch.Tensor):
            if v.numel() > 16:
                return (id(m),)  # tensor state we cannot key cheaply: probe per instance
            items.append((k, tuple(v.detach().cpu().reshape(-1).tolist())))
        else:
            return (id(m),)
    return tuple(items)


def _probed(m: nn.Module) -> tuple[str, dict[str, Any]] | None:
    if not _probeable(m):
        return None
    key = (type(m), _attr_key(m))
    with _lock:
        if key in _PROBE_CACHE:
            hit = _PROBE_CACHE[key]
            return None if hit is None else (hit[0], dict(hit[1]))
    result = _probe(m)
    if len(key[1]) == 1 and key[1][0] == id(m):
        return result  # per-instance key: not cached (ids are reused)
    with _lock:
        _PROBE_CACHE[key] = result
    return None if result is None else (result[0], dict(result[1]))


def _probe(m: nn.Module) -> tuple[str, dict[str, Any]] | None:
    buf = next(m.buffers(), None)
    device = buf.device if buf is not None else torch.device("cpu")
    if device.type == "meta":
        return None
    x = _probe_tensor().to(device=device, dtype=torch.float32)
    training = m.training
    try:
        m.training = False  # this module only (it has no children)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = m.forward(x.clone())  # not m(x): hooks (ours included) must not see the probe
    except Exception:  # needs other arguments, other shapes or dtypes: not an elementwise activation
        return None
    finally:
        m.training = training
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or not y.is_floating_point():
        return None
    y = y.detach().to(torch.float64).cpu()
    if not bool(torch.isfinite(y).all()):
        return None
    return _fit(x.to(torch.float64).cpu(), y)
