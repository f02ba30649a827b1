"""Guarded load of the compiled extension ``egp_fast._C`` (C++ CPU kernels, optional CUDA).

``import egp_fast`` works without the extension: a missing or broken build costs one warning
here and the ops fall back to their torch references. ``EGP_FAST_NO_EXT=1`` (or
``EGP_FAST_BUILD_EXT=0``) at run time skips the load on purpose, without a warning.

Attributes:
    HAS_CPP: the extension loaded; its CPU kernels are registered as ``torch.ops.egp_fast.*``.
    HAS_CUDA: it was also compiled with its CUDA kernels (a GPU is still checked per call).
    LOAD_ERROR: why it did not load (``None`` when it did).
    C: the loaded module, or ``None``.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

HAS_CPP: bool = False
HAS_CUDA: bool = False
LOAD_ERROR: str | None = None
C: ModuleType | None = None


def _disabled() -> bool:
    no_ext = os.environ.get("EGP_FAST_NO_EXT", "0").strip().lower() not in ("", "0", "false", "no", "off")
    build = os.environ.get("EGP_FAST_BUILD_EXT", "1").strip().lower() not in ("0", "false", "no", "off")
    return no_ext or not build


if _disabled():
    LOAD_ERROR = "disabled by EGP_FAST_NO_EXT=1 / EGP_FAST_BUILD_EXT=0"
else:
    try:
        import torch  # noqa: F401  (loads libtorch before the extension needs its symbols)

        from egp_fast import _C as C  # type: ignore[attr-defined]

        HAS_CPP = True
        HAS_CUDA = bool(getattr(C, "WITH_CUDA", False))
    except (ImportError, OSError) as e:
        LOAD_ERROR = f"{type(e).__name__}: {e}"
        warnings.warn(
            "egp_fast: compiled extension egp_fast._C not available, using the torch reference "
            f"ops (slower). Build it with `pip install --no-build-isolation -e .`. ({LOAD_ERROR})",
            RuntimeWarning,
            stacklevel=2,
        )
