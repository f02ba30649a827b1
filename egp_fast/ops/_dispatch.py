"""Backend registry and per-call dispatch for the ops in :mod:`egp_fast.ops`.

Every op has one pure-PyTorch reference (backend ``"torch"``) that defines its semantics.
Fast backends register implementations with the same signature (minus ``backend``):

* ``"cpp"``    - the compiled extension's CPU kernels (``egp_fast._C``)
* ``"cuda"``   - the compiled extension's CUDA kernels
* ``"triton"`` - Triton kernels (``egp_fast.kernels``); CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` (the interpreter used by the tests)

Choice, per call: an explicit ``backend=`` argument, else the ``EGP_FAST_BACKEND``
environment variable, else automatic. An explicitly requested backend that cannot run the
call raises :class:`~egp_fast.errors.BackendError`; the automatic choice falls back to the
next candidate quietly (one debug log line per op and device).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from egp_fast.errors import BackendError

log = logging.getLogger("egp_fast.ops")

BACKENDS = ("torch", "cpp", "cuda", "triton")

# op -> backend -> implementation
_IMPLS: dict[str, dict[str, Callable]] = {}

# Automatic preference per device type, per op. Ops not listed use the default order.
# Fast backends for an op may reorder their entry after benchmarking (see BENCHMARKS.md).
_AUTO_ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    "default": {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")},
    "sign_count": {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")},
    "relu_sign_count": {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")},
    "entropy": {"cuda": ("triton", "torch"), "cpu": ("torch",)},
    "masked_linear": {"cuda": ("triton", "torch"), "cpu": ("torch",)},
}

_logged_fallbacks: set[tuple[str, str]] = set()


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as the ``backend`` implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn: Callable) -> Callable:
        _IMPLS.setdefault(op, {})[backend] = fn
        return fn

    return deco


def set_auto_order(op: str, device_type: str, order: tuple[str, ...]) -> None:
    """Set the automatic backend preference of ``op`` on ``device_type`` (``"cpu"``/``"cuda"``)."""
    _AUTO_ORDER.setdefault(op, dict(_AUTO_ORDER["default"]))[device_type] = tuple(order)


def triton_interpret() -> bool:
    """True when Triton kernels are asked to run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _runs_on(backend: str, device_type: str) -> bool:
    if backend == "torch":
        return True
    if backend == "cpp":
        return device_type == "cpu"
    if backend == "cuda":
        return device_type == "cuda"
    if backend == "triton":
        return device_type == "cuda" or (device_type == "cpu" and triton_interpret())
    return False


def available_backends() -> list[str]:
    """The backends this install can use for at least one op, in the order
    ``["torch", "cpp", "cuda", "triton"]``.

    ``"cuda"`` and ``"triton"`` appear when their code is importable (and, for ``"cuda"``,
    compiled in); whether a CUDA device is present is checked per call.

    Example:
        >>> import egp_fast
        >>> "torch" in egp_fast.available_backends()
        True
    """
    present = {b for impls in _IMPLS.values() for b in impls}
    present.add("torch")
    return [b for b in BACKENDS if b in present]


def backend_for(op: str, backend: str | None) -> str | None:
    """The ``backend=`` to pass to ``op`` when a whole pipeline (``prune``, ``Pruner``,
    ``measure_entropy``) was asked to use ``backend``: the backend itself where ``op`` has an
    implementation in it, ``None`` (automatic) where it has none (no op exists in every
    backend: entropy has no C++ kernel, selection no Triton kernel).

    Raises:
        BackendError: ``backend`` is not a backend egp_fast knows, or is not installed.
    """
    if backend is None:
        return None
    if backend not in BACKENDS or backend not in available_backends():
        raise BackendError(
            f"backend={backend!r} is not {'installed' if backend in BACKENDS else 'a backend egp_fast knows'}"
            f"; use one of {', '.join(available_backends())} or None (automatic)"
        )
    return backend if backend in _IMPLS.get(op, {}) else None


def pick(op: str, backend: str | None, device: torch.device) -> tuple[str, Callable]:
    """Return ``(backend_name, implementation)`` for one call of ``op`` on ``device``."""
    impls = _IMPLS.get(op, {})
    device_type = device.type
    requested = backend
    if requested is None:
        env = os.environ.get("EGP_FAST_BACKEND") or None
        # The variable is global: ops that have no kernel in an installed backend use the
        # automatic choice instead of failing (EGP_FAST_BACKEND=cpp must not break entropy).
        requested = env if env is None or env not in available_backends() or env in impls else None
    if requested is not None:
        if requested not in BACKENDS:
            raise BackendError(
                f"backend={requested!r} is not a backend egp_fast knows; "
                f"use one of {', '.join(BACKENDS)} (installed: {', '.join(available_backends())})"
            )
        if requested not in impls:
            why = (
                "the compiled extension is not built or failed to load (see egp_fast._ext.LOAD_ERROR)"
                if requested in ("cpp", "cuda") and requested not in available_backends()
                else "Triton is not importable"
                if requested == "triton" and requested not in available_backends()
                else "it has no implementation of this op"
            )
            raise BackendError(
                f"backend={requested!r} cannot run {op}: {why}. Available here: "
                f"{', '.join(b for b in BACKENDS if b in impls or b == 'torch')}; "
                "pass backend=None to choose automatically"
            )
        if not _runs_on(requested, device_type):
            hint = (
                " (set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors)"
                if requested == "triton"
                else ""
            )
            raise BackendError(
                f"backend={requested!r} cannot run {op} on {device_type} tensors{hint}; "
                "move the tensors or pass backend=None"
            )
        return requested, impls[requested]
    order = _AUTO_ORDER.get(op, _AUTO_ORDER["default"]).get(
        device_type, _AUTO_ORDER["default"].get(device_type, ("torch",))
    )
    for name in order:
        if name in impls and _runs_on(name, device_type):
            return name, impls[name]
    key = (op, device_type)
    if key not in _logged_fallbacks:
        _logged_fallbacks.add(key)
        log.debug("egp_fast: %s on %s uses the torch reference (no faster backend)", op, device_type)
    return "torch", impls["torch"]
