"""Shared benchmark helpers (pytest-benchmark), used by every ``benchmarks/bench_<op>.py``.

Providers are ``"reference"`` (the op's torch reference, imported, never copied) plus every
registered fast backend that can run the op on the device. Benchmarks parametrize over
:func:`providers` and call :func:`run_op`, so a backend added later shows up without edits.

Run: ``.venv/bin/python -m pytest benchmarks/bench_select.py --benchmark-only``
(add ``--benchmark-json=out.json`` for the BENCHMARKS.md script).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton picks GPU or interpreter at decoration time, before egp_fast is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from egp_fast.ops import _dispatch  # noqa: E402

HAS_CUDA_DEVICE = torch.cuda.is_available()

requires_cuda = pytest.mark.skipif(not HAS_CUDA_DEVICE, reason="needs a CUDA device")


def providers(op: str, device_type: str = "cpu") -> list[str]:
    """``["reference", <backends that can run op on device_type>...]`` in dispatch order.

    Args:
        op: the dispatch name of the op (``"sign_count"``, ``"select_smallest"``...).
        device_type: ``"cpu"`` or ``"cuda"``.

    Returns:
        Provider names; ``"reference"`` stands for backend ``"torch"``. Triton on the CPU
        (interpreter) is left out: it is a correctness tool, not a benchmark target.

    Example:
        >>> providers("select_smallest", "cpu")  # doctest: +SKIP
        ['reference', 'cpp']
    """
    impls = _dispatch._IMPLS.get(op, {})
    out = ["reference"]
    for name in _dispatch.BACKENDS:
        if name == "torch" or name not in impls:
            continue
        if name == "triton" and device_type == "cpu":
            continue
        if _dispatch._runs_on(name, device_type):
            out.append(name)
    return out


def backend_of(provider: str) -> str:
    """The ``backend=`` argument for a provider name (``"reference"`` -> ``"torch"``)."""
    return "torch" if provider == "reference" else provider


def sync(device: torch.device | str) -> None:
    """Wait for queued device work, so a timed function measures the work, not the launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_timed(benchmark, fn, *args, device="cpu", rounds: int = 5, warmup_rounds: int = 3, **kwargs):
    """Time ``fn(*args, **kwargs)`` with ``benchmark.pedantic``, synchronizing on GPUs.

    Returns:
        Whatever the last call of ``fn`` returned.
    """

    def target():
        out = fn(*args, **kwargs)
        sync(device)
        return out

    return benchmark.pedantic(target, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)


def machine() -> str:
    """A short description of where the benchmark ran, for ``benchmark.extra_info``."""
    if HAS_CUDA_DEVICE:
        return torch.cuda.get_device_name()
    return f"cpu x{torch.get_num_threads()} threads"
