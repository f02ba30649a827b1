"""Ops with a torch reference and optional fast backends (see ``_dispatch``).

Optional backends live in ``_ext_backend`` (compiled C++/CUDA extension) and
``_triton_backend`` (Triton kernels); each registers its implementations on import and is
skipped quietly when its dependency is missing.
"""

from __future__ import annotations

import importlib
import logging

from egp_fast.ops._dispatch import available_backends, backend_for, pick, register
from egp_fast.ops.entropy import EntropyOut, binary_entropy, entropy, reference_entropy
from egp_fast.ops.masked_linear import masked_linear, reference_masked_linear
from egp_fast.ops.select import (
    global_smallest,
    reference_global_smallest,
    reference_select_smallest,
    select_smallest,
)
from egp_fast.ops.select_counts import global_smallest_counts, reference_global_smallest_counts
from egp_fast.ops.sign_count import (
    reference_relu_sign_count,
    reference_sign_count_,
    relu_sign_count,
    sign_count_,
)

_log = logging.getLogger("egp_fast.ops")

for _mod in ("egp_fast.ops._ext_backend", "egp_fast.ops._triton_backend"):
    try:
        importlib.import_module(_mod)
    except ImportError as _e:  # optional backend absent: the reference serves
        _log.debug("egp_fast: optional backend %s not loaded: %s", _mod, _e)

__all__ = [
    "EntropyOut",
    "available_backends",
    "backend_for",
    "binary_entropy",
    "entropy",
    "global_smallest",
    "global_smallest_counts",
    "masked_linear",
    "pick",
    "reference_entropy",
    "reference_global_smallest",
    "reference_global_smallest_counts",
    "reference_masked_linear",
    "reference_relu_sign_count",
    "reference_select_smallest",
    "reference_sign_count_",
    "register",
    "relu_sign_count",
    "select_smallest",
    "sign_count_",
]
