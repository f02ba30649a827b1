"""Whether the compiled extension loaded, without importing it twice (see ``_ext``)."""

from __future__ import annotations


def has_cpp() -> bool:
    """True when ``egp_fast._C`` is built and loaded (CPU kernels available)."""
    try:
        from egp_fast import _ext
    except ImportError:
        return False
    return bool(getattr(_ext, "HAS_CPP", False))


def has_cuda() -> bool:
    """True when the extension was built with its CUDA kernels."""
    try:
        from egp_fast import _ext
    except ImportError:
        return False
    return bool(getattr(_ext, "HAS_CUDA", False))
