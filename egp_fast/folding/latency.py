"""Interleaved latency comparison of two models (before/after collapse, or any pair).

Timing one model, then the other, lets machine load that drifts between the two phases decide
the answer (a report once showed a slow-down for a pair that is faster when timed carefully).
:func:`compare_latency` alternates the two models run by run (``a b``, then ``b a``),
so both see the same conditions, and judges the speed-up from the paired ratios.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from egp_fast.errors import ConfigError
from egp_fast.graph import eval_mode, normalize_inputs, unwrap_model

__all__ = ["compare_latency"]


def _batched(example_inputs: Any, b: int) -> tuple[tuple, dict]:
    args, kwargs = normalize_inputs(example_inputs)

    def rep(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] >= 1:
            return v[:1].expand(b, *v.shape[1:]).contiguous()
        return v

    return tuple(rep(a) for a in args), {k: rep(v) for k, v in kwargs.items()}


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def compare_latency(
    model_a: nn.Module,
    model_b: nn.Module,
    example_inputs: Any,
    batch_sizes: Sequence[int] = (1, 64),
    *,
    budget_s: float = 3.0,
    min_rounds: int = 5,
    max_rounds: int = 15,
    min_run_s: float = 0.005,
) -> dict[str, Any]:
    """Time ``model_a`` and ``model_b`` interleaved and say how they compare, with a spread.

    For each batch size (the first sample of ``example_inputs`` repeated), both models are
    warmed up, then timed in rounds: ``a`` then ``b`` in even rounds, ``b`` then ``a`` in odd
    ones, so slow drifts of the machine hit both equally. One run is ``k`` forwards (``k`` chosen
    so a run lasts at least ``min_run_s``); the result is per forward. Rounds continue until
    ``budget_s`` is spent (at least ``min_rounds``, at most ``max_rounds``). Models run in eval
    mode under ``no_grad``; their training flags are restored.

    Args:
        model_a: the reference model (e.g. before collapse).
        model_b: the model compared with it (e.g. the collapsed one).
        example_inputs: a batch both accept (tensor, tuple or dict).
        batch_sizes: batch sizes to time.
        budget_s: wall-clock budget per batch size (both models together).
        min_rounds: rounds always done (each times both models once).
        max_rounds: rounds at most.
        min_run_s: shortest run; short forwards are repeated within a run.

    Returns:
        ``{"threads": int, "device": str, "batches": {batch: row}}`` where each row has
        ``a_ms`` and ``b_ms`` (medians per forward), ``a_iqr_ms`` and ``b_iqr_ms``
        (25th-75th percentiles), ``speedup`` (median of the paired ratios a / b: above 1 means
        ``b`` is faster), ``speedup_iqr`` (25th-75th percentile of the paired ratios),
        ``ratio_of_medians`` (``a_ms / b_ms``), ``rounds``, ``forwards_per_run``,
        ``inside_noise`` (True when the paired ratios' interquartile range contains 1, or the
        two estimators disagree on which model is faster: the difference is not measurable here) and ``verdict``
        (one readable sentence).

    Raises:
        ConfigError: an empty or non-positive ``batch_sizes``, or bad round/budget settings.

    Example:
        >>> import torch
        >>> a = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> r = compare_latency(a, a, torch.randn(2, 8), batch_sizes=(1,), budget_s=0.05)
        >>> sorted(r["batches"][1])[:4]
        ['a_iqr_ms', 'a_ms', 'b_iqr_ms', 'b_ms']
    """
    sizes = list(batch_sizes)
    if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        raise ConfigError(f"batch_sizes={batch_sizes!r} must be a non-empty sequence of positive ints")
    if not (isinstance(min_rounds, int) and isinstance(max_rounds, int) and 1 <= min_rounds <= max_rounds):
        raise ConfigError(f"need 1 <= min_rounds <= max_rounds, got min_rounds={min_rounds!r}, "
                          f"max_rounds={max_rounds!r}")
    if not budget_s > 0 or not min_run_s >= 0:
        raise ConfigError(f"budget_s={budget_s!r} must be > 0 and min_run_s={min_run_s!r} >= 0")
    a, b = unwrap_model(model_a), unwrap_model(model_b)
    device = next((p.device for p in a.parameters()), None)
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "device": str(device or "cpu"), "batches": {}}
    with eval_mode(a), eval_mode(b):
        for bs in sizes:
            args, kwargs = _batched(example_inputs, bs)

            def once(m: nn.Module, k: int, args: tuple = args, kwargs: dict = kwargs) -> float:
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(k):
                    m(*args, **kwargs)
                _sync(device)
                return time.perf_counter() - t0

            # Warm-up (allocator, lazy init), and the repeat count from the slower model.
            once(a, 1), once(b, 1)
            k = max(1, math.ceil(min_run_s / max(min(once(a, 1), once(b, 1)), 1e-9)))
            ta: list[float] = []
            tb: list[float] = []
            start = time.perf_counter()
            r = 0
            while r < max_rounds and (r < min_rounds or time.perf_counter() - start < budget_s):
                if r % 2 == 0:
                    ta.append(once(a, k)), tb.append(once(b, k))
                else:
                    tb.append(once(b, k)), ta.append(once(a, k))
                r += 1
            ratios = [x / y for x, y in zip(ta, tb)]
            row = {
                "a_ms": 1e3 * statistics.median(ta) / k,
                "b_ms": 1e3 * statistics.median(tb) / k,
                "a_iqr_ms": [1e3 * _quantile(ta, 0.25) / k, 1e3 * _quantile(ta, 0.75) / k],
                "b_iqr_ms": [1e3 * _quantile(tb, 0.25) / k, 1e3 * _quantile(tb, 0.75) / k],
                "speedup": statistics.median(ratios),
                "speedup_iqr": [_quantile(ratios, 0.25), _quantile(ratios, 0.75)],
                "rounds": r,
                "forwards_per_run": k,
            }
            # The two estimators agree on a quiet machine; under load they can differ a lot, so
            # both are reported and a disagreement about the sign of the difference is noise.
            row["ratio_of_medians"] = row["a_ms"] / row["b_ms"] if row["b_ms"] > 0 else float("inf")
            lo, hi = row["speedup_iqr"]
            s = row["speedup"]
            row["inside_noise"] = lo <= 1.0 <= hi or (s - 1.0) * (row["ratio_of_medians"] - 1.0) < 0
            spread = (f"paired ratio {lo:.2f}-{hi:.2f} over {r} interleaved rounds; ratio of medians "
                      f"{row['ratio_of_medians']:.2f}x")
            if row["inside_noise"]:
                row["verdict"] = f"no measurable difference at batch {bs} ({s:.2f}x, {spread})"
            elif s >= 1.0:
                row["verdict"] = f"b is {s:.2f}x faster at batch {bs} ({spread})"
            else:
                row["verdict"] = f"b is {1 / s:.2f}x slower at batch {bs} ({spread})"
            out["batches"][bs] = row
    return out
