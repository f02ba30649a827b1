"""Shared inputs of the selection tests (test_select.py, test_select16.py): weight/mask cases
with ties and special values, and a fixture that restricts which C++ select paths may run."""

from __future__ import annotations

import pytest
import torch

from egp_fast import _ext

SAMPLED_PATH, TWO_PASS, RADIX = 0, 1, 2  # egp_fast._C._select_path_counts() order


@pytest.fixture
def paths():
    """Restrict the C++ select paths (bit 0 sampled, bit 1 two-pass); returns a counter reader."""
    C = _ext.C
    C._select_path_counts(reset=True)

    def use(bits: int):
        C._set_select_paths(bits)
        return lambda: C._select_path_counts(reset=True)

    yield use
    C._set_select_paths(3)


def make_case(kind: str, n: int, dtype: torch.dtype, keep: float, gen: torch.Generator,
              bucket: tuple[int, float] = (50, 2.0**-20)):
    """Weights of ``kind`` (random, ties, special: NaN/±inf/±0, one_bucket: ``bucket[0]``
    magnitudes ``bucket[1]`` apart just above 1.0) and a mask keeping about ``keep`` of them."""
    if kind == "random":
        w = torch.randn(n, generator=gen)
    elif kind == "ties":
        w = torch.randint(-3, 4, (n,), generator=gen).float() * 0.25
    elif kind == "special":
        w = torch.randn(n, generator=gen)
        r = torch.rand(n, generator=gen)
        w[r < 0.05] = float("nan")
        w[(r >= 0.05) & (r < 0.1)] = float("inf")
        w[(r >= 0.1) & (r < 0.15)] = -float("inf")
        w[(r >= 0.15) & (r < 0.3)] = -0.0
        w[(r >= 0.3) & (r < 0.4)] = 0.0
    elif kind == "one_bucket":
        w = 1.0 + torch.randint(0, bucket[0], (n,), generator=gen).float() * bucket[1]
    else:
        raise AssertionError(kind)
    m = torch.rand(n, generator=gen) < keep
    return w.to(dtype), m
