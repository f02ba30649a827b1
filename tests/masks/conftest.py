"""Fixtures of the masks tests."""

from __future__ import annotations

import pytest
from _mask_helpers import extension_kernel

from egp_fast.masks import guard


@pytest.fixture(params=["kernel", "bits"])
def zero_path(request, monkeypatch):
    """How pruned entries are zeroed on the CPU: the extension's zero_pruned_, or (a build
    without it) the cached int bit mask. The test must go through the path it names."""
    used = []
    if request.param == "bits":
        monkeypatch.setattr(guard, "_ZERO_PRUNED", None)

        class _Seen(dict):  # the bit-mask path looks up the int dtype of the tensor's width
            def get(self, key, default=None):
                used.append(key)
                return super().get(key, default)

        monkeypatch.setattr(guard, "_BITS", _Seen(guard._BITS))
    else:
        real = extension_kernel()
        monkeypatch.setattr(guard, "_ZERO_PRUNED", lambda t, p: (used.append(t.shape), real(t, p))[1])
    yield request.param
    assert used, f"the {request.param} zeroing path was never used"
