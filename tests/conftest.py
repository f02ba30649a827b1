"""Shared test setup.

Triton decides at decoration time whether kernels run on the GPU or in its CPU interpreter,
so ``TRITON_INTERPRET`` is set here, before anything imports ``egp_fast``.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import egp_fast  # noqa: E402  (after TRITON_INTERPRET is settled)
from egp_fast import _ext  # noqa: E402


def _triton_usable() -> bool:
    return "triton" in egp_fast.available_backends() and (
        torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    )


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
requires_triton = pytest.mark.skipif(not _triton_usable(), reason="needs Triton (GPU or interpreter)")
requires_ext = pytest.mark.skipif(not _ext.HAS_CPP, reason="needs the compiled extension egp_fast._C")


def pytest_collection_modifyitems(config, items):
    # Let tests use the plain marks from pyproject.toml too (@pytest.mark.requires_cuda...).
    for item in items:
        if item.get_closest_marker("requires_cuda") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if item.get_closest_marker("requires_triton") and not _triton_usable():
            item.add_marker(pytest.mark.skip(reason="needs Triton (GPU or interpreter)"))
        if item.get_closest_marker("requires_ext") and not _ext.HAS_CPP:
            item.add_marker(pytest.mark.skip(reason="needs the compiled extension egp_fast._C"))


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    torch.manual_seed(0)
    try:
        import numpy as np

        np.random.seed(0)
    except ImportError:
        pass
    yield
